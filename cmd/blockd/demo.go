package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/sirupsen/logrus"
)

// runDemo sets up the built-in demo in dir and runs the daemon on it until
// interrupted.
func runDemo(log *logrus.Logger, dir string) int {
	if dir == "" {
		dir = "demo"
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: --demo: %v\n", err)
		return 1
	}
	args, info, err := prepareDemo(abs)
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockd: --demo: %v\n", err)
		return 1
	}
	fmt.Print(info)
	return run(args)
}
