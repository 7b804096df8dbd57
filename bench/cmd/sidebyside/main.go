// Command sidebyside runs the same NBD workloads against
// qemu-storage-daemon, blockd and (on the raw and luks setups) nbdkit on the
// same tmpfs images, and qemu-img convert against blockd-img convert, and
// prints each figure for every server and blockd's ratios to the others.
// See docs/performance.md.
//
//	go run ./bench/cmd/sidebyside [-quick] [-reps N] [-size BYTES] [-runtime D] [-ramp D] [-no-nbdkit]
//	    [-configs raw,luks,...,chain-qcow2,...] [-workloads randread-4k-qd32-c1,...] [-jobdir DIR] [-markdown] [-spread]
//	    [-profile DIR] [-syscalls]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"blockd/bench"
)

func main() {
	def := bench.DefaultOptions()
	quick := flag.Bool("quick", false, "CI smoke run: 64 MiB disks, 0.5 s per fio run, 1 repetition (other flags still apply)")
	reps := flag.Int("reps", 0, fmt.Sprintf("repetitions per workload; the report gives the median (default %d, 1 with -quick)", def.Reps))
	size := flag.Int64("size", 0, fmt.Sprintf("disk size in bytes (default %d, 64 MiB with -quick)", def.Size))
	runtime := flag.Duration("runtime", 0, fmt.Sprintf("measured time of each fio run (default %v, 500ms with -quick)", def.Runtime))
	ramp := flag.Duration("ramp", -1, fmt.Sprintf("fio warm-up before measuring (default %v, 0 with -quick)", def.Ramp))
	dir := flag.String("dir", def.Dir, "where to put the images (a tmpfs)")
	jobDir := flag.String("jobdir", "", "where the block job rows run on copies of their chain images (default: -dir; a disk directory shows the cost of flushes)")
	configs := flag.String("configs", "", "comma-separated setups to run (default all): "+strings.Join(bench.ConfigNames(), ","))
	workloads := flag.String("workloads", "", "comma-separated NBD workloads to run (default all): "+strings.Join(bench.WorkloadNames(), ","))
	blockd := flag.String("blockd", "", "prebuilt blockd binary (default: build from the module)")
	blockdImg := flag.String("blockd-img", "", "prebuilt blockd-img binary (default: build from the module)")
	markdown := flag.Bool("markdown", false, "print the table as Markdown")
	spreads := flag.Bool("spread", false, "print each median's min–max over the repetitions")
	profile := flag.String("profile", "", "write CPU profiles of blockd per workload (and mutex profiles) to this directory")
	syscalls := flag.Bool("syscalls", false, "count the server's system calls and context switches per I/O with perf stat")
	noNBDKit := flag.Bool("no-nbdkit", false, "leave nbdkit out (by default it is a third peer on the raw and luks setups)")
	quiet := flag.Bool("q", false, "no progress lines on stderr")
	flag.Parse()

	o := def
	if *quick {
		o = bench.QuickOptions()
	}
	if *reps > 0 {
		o.Reps = *reps
	}
	if *size > 0 {
		o.Size = *size
	}
	if *runtime > 0 {
		o.Runtime = *runtime
	}
	if *ramp >= 0 {
		o.Ramp = *ramp
	}
	o.Syscalls = *syscalls
	o.NoNBDKit = *noNBDKit
	o.JobDir = *jobDir
	o.Dir, o.Blockd, o.BlockdImg, o.ProfileDir = *dir, *blockd, *blockdImg, *profile
	if *configs != "" {
		o.Configs = strings.Split(*configs, ",")
	}
	if *workloads != "" {
		o.Workloads = strings.Split(*workloads, ",")
	}
	if !*quiet {
		o.Log = os.Stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	res, err := bench.Run(ctx, o)
	if res != nil && len(res.Rows) > 0 {
		if *markdown {
			res.WriteMarkdown(os.Stdout, *spreads)
		} else {
			res.WriteText(os.Stdout, *spreads)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sidebyside: %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "sidebyside: done in %s\n", time.Since(start).Round(time.Second))
}
