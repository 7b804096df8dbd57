// Command blockd-img is a qemu-img compatible image tool built on blockd's
// block graph and drivers.
package main

import (
	"os"

	"blockd/cmd/blockd-img/blockdimg"
)

func main() {
	os.Exit(blockdimg.Main(os.Args[1:], os.Stdout, os.Stderr))
}
