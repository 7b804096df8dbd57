package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Options configure a side-by-side run.
type Options struct {
	// Dir is where the scratch directory with the images is made; it
	// should be a tmpfs so that the storage is not what is measured.
	Dir string
	// Size is the virtual size of every disk (and what nbdcopy copies).
	Size int64
	// Runtime and Ramp are each fio run's measured time and the warm-up
	// before it.
	Runtime, Ramp time.Duration
	// Reps is how many times each workload runs on each daemon; the
	// report gives the median.
	Reps int
	// Configs and Workloads select by name (see ConfigNames and
	// WorkloadNames); empty means all.
	Configs, Workloads []string
	// Blockd and BlockdImg are prebuilt binaries; empty means build them
	// from the module (blockd-img is skipped when it does not build).
	Blockd, BlockdImg string
	// ProfileDir, when set, builds blockd with a pprof listener and
	// writes a CPU profile of blockd for every workload there, plus a
	// mutex profile per daemon run. Profiling costs a few percent.
	ProfileDir string
	// NoNBDKit leaves nbdkit out; by default it runs as a third peer on
	// the setups it can serve when it is installed.
	NoNBDKit bool
	// Syscalls counts the server's system calls and context switches
	// per I/O during each fio run with perf stat (needs perf and the
	// raw_syscalls tracepoint). perf attaches to the threads that exist
	// when the measured window starts.
	Syscalls bool
	// JobDir, when set, is where the block job rows run their working
	// copies of the chain images (a disk file system, where the jobs'
	// flushes cost what they cost in use); empty means Dir.
	JobDir string
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// DefaultOptions is a full run: 1 GiB disks, 8 s of fio after 2 s of
// warm-up, three repetitions.
func DefaultOptions() Options {
	return Options{Dir: "/dev/shm", Size: 1 << 30, Runtime: 8 * time.Second, Ramp: 2 * time.Second, Reps: 3}
}

// QuickOptions is a smoke run for CI: 64 MiB disks, 0.5 s per fio run, one
// repetition; it finishes in about two minutes.
func QuickOptions() Options {
	return Options{Dir: "/dev/shm", Size: 64 << 20, Runtime: 500 * time.Millisecond, Reps: 1}
}

// Tools are the peer tools a run needs. nbdkit is optional: without it the
// nbdkit column stays empty.
var Tools = []string{"qemu-storage-daemon", "qemu-img", "qemu-io", "fio", "nbdcopy", "nbdinfo", "cryptsetup", "go"}

// MissingTools returns the peer tools that are not on PATH.
func MissingTools() []string {
	var miss []string
	for _, t := range Tools {
		if _, err := exec.LookPath(t); err != nil {
			miss = append(miss, t)
		}
	}
	return miss
}

// runner holds one run's state.
type runner struct {
	o      Options
	ctx    context.Context
	dir    string // scratch directory
	blockd string
	img    string // blockd-img, "" when unavailable
	imgs   *images
	qcow2  bool            // blockd has the qcow2 driver
	nbdkit map[string]bool // nbdkit filters available ("" for nbdkit itself)
	res    *Results
}

func (r *runner) logf(format string, args ...any) {
	if r.o.Log != nil {
		fmt.Fprintf(r.o.Log, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
}

// Run performs the side-by-side run and returns its results.
func Run(ctx context.Context, o Options) (*Results, error) {
	if miss := MissingTools(); len(miss) > 0 {
		return nil, fmt.Errorf("missing tools: %s", strings.Join(miss, ", "))
	}
	if o.Syscalls {
		if _, err := exec.LookPath("perf"); err != nil {
			return nil, errors.New("-syscalls needs perf")
		}
	}
	if o.Reps < 1 {
		o.Reps = 1
	}
	if o.Size < 16<<20 || o.Size%(4<<20) != 0 {
		return nil, errors.New("size must be a multiple of 4 MiB and at least 16 MiB")
	}
	for _, c := range o.Configs {
		if !slices.Contains(ConfigNames(), c) {
			return nil, fmt.Errorf("unknown config %q (have %s)", c, strings.Join(ConfigNames(), ", "))
		}
	}
	for _, w := range o.Workloads {
		if !slices.Contains(WorkloadNames(), w) {
			return nil, fmt.Errorf("unknown workload %q (have %s)", w, strings.Join(WorkloadNames(), ", "))
		}
	}
	dir, err := os.MkdirTemp(o.Dir, "blockd-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	r := &runner{o: o, ctx: ctx, dir: dir, res: newResults(o)}
	if err := r.binaries(); err != nil {
		return nil, err
	}
	if o.ProfileDir != "" {
		if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
			return nil, err
		}
	}
	r.qcow2 = r.blockdHasDriver("qcow2")
	r.nbdkit = map[string]bool{}
	r.res.Notes = append(r.res.Notes, "load average at start: "+loadavg())
	defer func() { r.res.Notes = append(r.res.Notes, "load average at end: "+loadavg()) }()
	r.imgs = &images{dir: dir, size: o.Size, log: r.logf}
	if err := r.imgs.common(ctx); err != nil {
		return nil, err
	}
	for _, c := range configs {
		if !r.wantConfig(c.Name) {
			continue
		}
		if c.NeedsQcow2 && !r.qcow2 {
			r.res.Notes = append(r.res.Notes, fmt.Sprintf("%s: skipped, blockd has no qcow2 driver", c.Name))
			continue
		}
		if err := r.runConfig(c); err != nil {
			return r.res, fmt.Errorf("%s: %w", c.Name, err)
		}
	}
	for _, c := range chains {
		if !r.wantConfig(c.Name) {
			continue
		}
		if !r.qcow2 {
			r.res.Notes = append(r.res.Notes, fmt.Sprintf("%s: skipped, blockd has no qcow2 driver", c.Name))
			continue
		}
		if err := r.runChain(c); err != nil {
			return r.res, fmt.Errorf("%s: %w", c.Name, err)
		}
	}
	if r.wantConfig("convert") {
		if r.img == "" {
			r.res.Notes = append(r.res.Notes, "convert: skipped, blockd-img does not build")
		} else if err := r.runConvert(); err != nil {
			return r.res, fmt.Errorf("convert: %w", err)
		}
	}
	return r.res, nil
}

// loadavg is /proc/loadavg's 1, 5 and 15 minute figures: the machine is
// shared, and a busy one shows in every figure.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func (r *runner) wantConfig(name string) bool {
	return len(r.o.Configs) == 0 || slices.Contains(r.o.Configs, name)
}

func (r *runner) wantWorkload(name string) bool {
	return len(r.o.Workloads) == 0 || slices.Contains(r.o.Workloads, name)
}

// binaries builds blockd (with the pprof hook when profiling) and
// blockd-img unless prebuilt ones were given.
func (r *runner) binaries() error {
	r.blockd, r.img = r.o.Blockd, r.o.BlockdImg
	if r.blockd == "" || r.o.ProfileDir != "" {
		args := []string{"build", "-o", filepath.Join(r.dir, "blockd")}
		if r.o.ProfileDir != "" {
			ov, err := writeProfileOverlay(r.dir)
			if err != nil {
				return err
			}
			args = append(args, "-overlay", ov)
		}
		args = append(args, "blockd/cmd/blockd")
		r.logf("go %s", strings.Join(args, " "))
		if out, err := exec.CommandContext(r.ctx, "go", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("building blockd: %v\n%s", err, out)
		}
		r.blockd = filepath.Join(r.dir, "blockd")
	}
	if r.img == "" {
		out, err := exec.CommandContext(r.ctx, "go", "build", "-o", filepath.Join(r.dir, "blockd-img"), "blockd/cmd/blockd-img").CombinedOutput()
		if err != nil {
			r.logf("blockd-img does not build, convert is skipped:\n%s", out)
		} else {
			r.img = filepath.Join(r.dir, "blockd-img")
		}
	}
	return nil
}

// blockdHasDriver reports whether blockd accepts a driver name: opening a
// node of that driver on a missing file fails with a different error than
// an unknown driver does.
func (r *runner) blockdHasDriver(name string) bool {
	out, _ := exec.CommandContext(r.ctx, r.blockd, "--blockdev",
		"driver="+name+",node-name=probe,file.driver=file,file.filename="+filepath.Join(r.dir, "nonexistent")).CombinedOutput()
	return !strings.Contains(string(out), "does not accept value '"+name+"'")
}

// NBDKitAvailable reports whether nbdkit is installed with its file plugin
// and the filter named ("" for none).
func NBDKitAvailable(ctx context.Context, filter string) bool {
	args := []string{"file", "--dump-plugin"}
	if filter != "" {
		args = append([]string{"--filter=" + filter}, args...)
	}
	return exec.CommandContext(ctx, "nbdkit", args...).Run() == nil
}

// hasNBDKit is NBDKitAvailable, asked once per filter and run.
func (r *runner) hasNBDKit(filter string) bool {
	ok, done := r.nbdkit[filter]
	if !done {
		ok = NBDKitAvailable(r.ctx, filter)
		r.nbdkit[filter] = ok
	}
	return ok
}

// peers returns the servers that run setup c, in report order.
func (r *runner) peers(c *Config) []Daemon {
	if c.BlockdOnly != "" {
		r.res.Notes = append(r.res.Notes, fmt.Sprintf("%s: blockd only; %s", c.Name, c.BlockdOnly))
		return []Daemon{Blockd}
	}
	daemons := []Daemon{QSD, Blockd}
	if c.NBDKit != nil && !r.o.NoNBDKit {
		if r.hasNBDKit(c.NBDKitFilter) {
			daemons = append(daemons, NBDKit)
		} else {
			r.res.Notes = append(r.res.Notes, fmt.Sprintf("%s: nbdkit skipped, not installed or without the %q filter", c.Name, c.NBDKitFilter))
		}
	}
	return daemons
}

// runConfig runs every selected workload against each server, Reps times,
// rotating which server goes first (with two servers: QSD first in odd
// repetitions, blockd first in even ones).
func (r *runner) runConfig(c *Config) error {
	if err := c.Make(r.ctx, r.imgs); err != nil {
		return err
	}
	daemons := r.peers(c)
	for rep := 1; rep <= r.o.Reps; rep++ {
		k := (rep - 1) % len(daemons)
		order := append(slices.Clone(daemons[k:]), daemons[:k]...)
		for _, d := range order {
			if c.Fresh != nil {
				if err := c.Fresh(r.ctx, r.imgs); err != nil {
					return err
				}
			}
			if err := r.runDaemon(c, d, rep); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *runner) runDaemon(c *Config, d Daemon, rep int) error {
	r.logf("%s: %s, repetition %d of %d", c.Name, d, rep, r.o.Reps)
	p, err := r.start(c, d)
	if err != nil {
		return err
	}
	defer p.stop()
	rss, rssErr := p.rss()
	for _, w := range workloads {
		if !r.wantWorkload(w.Name) {
			continue
		}
		if err := r.ctx.Err(); err != nil {
			return err
		}
		if err := r.runWorkload(c, w, d, p, rep); err != nil {
			return fmt.Errorf("%s on %s: %w\n%s", w.Name, d, err, p.logTail())
		}
	}
	if rssErr == nil {
		r.res.add(c.Name, idleRSS, d, sample{value: float64(rss) / (1 << 20)})
	}
	if p.pprof != "" {
		r.saveProfile(p, "mutex", fmt.Sprintf("%s-rep%d.mutex.pprof", c.Name, rep))
	}
	return p.stop()
}
