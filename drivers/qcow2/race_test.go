//go:build race

package qcow2_test

// raceEnabled shortens the long workloads under the race detector (see
// shortRun).
const raceEnabled = true
