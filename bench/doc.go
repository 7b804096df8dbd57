// Package bench runs the same workloads against qemu-storage-daemon (QSD)
// and blockd on the same images and reports both figures and their ratio.
//
// Run creates raw and LUKS images on tmpfs, starts each daemon in turn on
// them with the same --object, --blockdev, --nbd-server and --export
// arguments, drives its NBD export with fio (nbd engine) and nbdcopy, and
// times qemu-img convert against blockd-img convert. Each figure is the
// median of Options.Reps runs; the two daemons alternate within each
// repetition so that drift on a noisy machine affects both alike.
//
// bench/cmd/sidebyside is the command line. The tests in this package run
// the quick mode, and the benchmarks report the ratios through
// testing.B.ReportMetric; both only run with BLOCKD_BENCH=1 so that
// `go test ./...` stays fast.
package bench
