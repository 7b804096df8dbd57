//go:build !race

package blockcrypto

const raceEnabled = false
