//go:build race

package main

// raceBuild makes TestMain build blockd-img with the race detector when
// the tests themselves run with it, so that the convert and bench workers
// are checked too.
const raceBuild = true
