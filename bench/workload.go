package bench

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Workload is one measurement against an NBD export.
type Workload struct {
	Name  string
	Label string
	fio   *fioJob // nil: nbdcopy of the whole disk to null:
}

type fioJob struct {
	rw    string // fio's rw: randread, randwrite, read, write
	bs    int64
	depth int
	jobs  int // connections (one per fio job)
}

// workloads run in this order on every daemon start: reads before writes,
// so that a fresh qcow2 image is read unallocated.
var workloads = []*Workload{
	{"randread-4k-qd32-c1", "4 KiB random read, QD32, 1 conn", &fioJob{"randread", 4 << 10, 32, 1}},
	{"randread-4k-qd32-c4", "4 KiB random read, QD32, 4 conns", &fioJob{"randread", 4 << 10, 32, 4}},
	{"read-1m-qd8-c1", "1 MiB sequential read, QD8, 1 conn", &fioJob{"read", 1 << 20, 8, 1}},
	{"read-1m-qd8-c4", "1 MiB sequential read, QD8, 4 conns", &fioJob{"read", 1 << 20, 8, 4}},
	{"nbdcopy", "nbdcopy whole disk to null:", nil},
	{"randwrite-4k-qd32-c1", "4 KiB random write, QD32, 1 conn", &fioJob{"randwrite", 4 << 10, 32, 1}},
	{"randwrite-4k-qd32-c4", "4 KiB random write, QD32, 4 conns", &fioJob{"randwrite", 4 << 10, 32, 4}},
	{"write-1m-qd8-c1", "1 MiB sequential write, QD8, 1 conn", &fioJob{"write", 1 << 20, 8, 1}},
	{"write-1m-qd8-c4", "1 MiB sequential write, QD8, 4 conns", &fioJob{"write", 1 << 20, 8, 4}},
}

// WorkloadNames lists the NBD workloads in run order.
func WorkloadNames() []string {
	var n []string
	for _, w := range workloads {
		n = append(n, w.Name)
	}
	return n
}

// Metric describes one row of the report.
type Metric struct {
	Name, Label string
	Unit        string
	LowerBetter bool
	// Info rows are context, not a contest: no arrow, ratios not in bold.
	Info bool
	// CPUUnit is the unit of the server CPU column ("" when none).
	CPUUnit string
}

var idleRSS = &Metric{Name: "rss-idle", Label: "resident memory after start", Unit: "MiB", LowerBetter: true}

func throughputMetric(w *Workload) *Metric {
	switch {
	case w.fio == nil:
		return &Metric{Name: w.Name, Label: w.Label, Unit: "s", LowerBetter: true, CPUUnit: "CPU s/GiB"}
	case w.fio.bs < 64<<10:
		return &Metric{Name: w.Name, Label: w.Label, Unit: "kIOPS", CPUUnit: "CPU µs/IO"}
	default:
		return &Metric{Name: w.Name, Label: w.Label, Unit: "MiB/s", CPUUnit: "CPU ms/GiB"}
	}
}

// clientCPUMetric is fio's own CPU use, summed over its jobs (connections):
// near 100 % per job, the client and not the server bounds the row.
func clientCPUMetric(w *Workload) *Metric {
	return &Metric{Name: w.Name + "-client", Label: w.Label + ", client (fio) CPU", Unit: "% of a core", Info: true}
}

func latencyMetric(w *Workload) *Metric {
	return &Metric{Name: w.Name + "-p99", Label: w.Label + ", p99 latency", Unit: "µs", LowerBetter: true}
}

// sample is one measurement: the figure and the server CPU per unit of
// work (0 when not measured).
type sample struct{ value, cpu float64 }

func (r *runner) runWorkload(c *Config, w *Workload, d Daemon, p *process, rep int) error {
	if w.fio == nil {
		return r.runNbdcopy(c, w, d, p)
	}
	j := w.fio
	per := r.o.Size / int64(j.jobs)
	args := []string{
		"--name=bench", "--ioengine=nbd", "--uri=" + p.uri,
		"--rw=" + j.rw, fmt.Sprintf("--bs=%d", j.bs), fmt.Sprintf("--iodepth=%d", j.depth),
		fmt.Sprintf("--numjobs=%d", j.jobs), fmt.Sprintf("--size=%d", per), fmt.Sprintf("--offset_increment=%d", per),
		"--time_based=1", fmt.Sprintf("--runtime=%dms", r.o.Runtime.Milliseconds()),
		fmt.Sprintf("--ramp_time=%dms", r.o.Ramp.Milliseconds()),
		"--norandommap=1", "--randrepeat=0", "--group_reporting=1", "--output-format=json",
	}
	cmd := exec.CommandContext(r.ctx, "fio", args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// Server CPU is counted from the end of the ramp to fio's exit.
	select {
	case err := <-exited:
		return fmt.Errorf("fio exited during the ramp: %v\n%s", err, errb.String())
	case <-time.After(r.o.Ramp):
	}
	cpu0, err := p.cpu()
	if err != nil {
		return err
	}
	t0 := time.Now()
	var ps *perfStat
	if r.o.Syscalls {
		if ps, err = startPerf(p.cmd.Process.Pid); err != nil {
			return err
		}
	}
	prof := make(chan struct{})
	if p.pprof != "" {
		secs := max(1, int(r.o.Runtime.Seconds()))
		go func() {
			defer close(prof)
			r.saveProfile(p, fmt.Sprintf("profile?seconds=%d", secs), fmt.Sprintf("%s-%s-rep%d.cpu.pprof", c.Name, w.Name, rep))
		}()
	} else {
		close(prof)
	}
	werr := <-exited
	cpu1, cerr := p.cpu()
	window := time.Since(t0)
	var sys, cs float64
	if ps != nil {
		sys, cs, err = ps.stop()
		if err != nil {
			return err
		}
	}
	<-prof
	if werr != nil {
		return fmt.Errorf("fio %s: %v\n%s", strings.Join(args, " "), werr, errb.String())
	}
	if cerr != nil {
		return cerr
	}
	st, err := parseFio(out.Bytes(), j.rw)
	if err != nil {
		return fmt.Errorf("fio output: %w\n%s", err, errb.String())
	}
	cpu := (cpu1 - cpu0).Seconds()
	ios := st.IOPS * window.Seconds()
	m := throughputMetric(w)
	if j.bs < 64<<10 {
		r.res.add(c.Name, m, d, sample{st.IOPS / 1000, cpu / ios * 1e6})
		r.res.add(c.Name, latencyMetric(w), d, sample{st.P99 / 1000, 0})
		r.res.add(c.Name, clientCPUMetric(w), d, sample{st.ClientCPU * float64(j.jobs), 0})
	} else {
		gib := float64(st.BW) * window.Seconds() / (1 << 30)
		r.res.add(c.Name, m, d, sample{float64(st.BW) / (1 << 20), cpu / gib * 1000})
	}
	if ps != nil {
		r.res.add(c.Name, &Metric{Name: w.Name + "-syscalls", Label: w.Label + ", server syscalls per I/O", Unit: "calls/IO", LowerBetter: true}, d, sample{sys / ios, 0})
		r.res.add(c.Name, &Metric{Name: w.Name + "-cs", Label: w.Label + ", server context switches per I/O", Unit: "cs/IO", LowerBetter: true}, d, sample{cs / ios, 0})
	}
	return nil
}

// perfStat counts a process's system calls and context switches.
type perfStat struct {
	cmd *exec.Cmd
	out bytes.Buffer
}

func startPerf(pid int) (*perfStat, error) {
	ps := &perfStat{}
	ps.cmd = exec.Command("perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter,context-switches", "-p", fmt.Sprint(pid))
	ps.cmd.Stderr = &ps.out
	if err := ps.cmd.Start(); err != nil {
		return nil, err
	}
	return ps, nil
}

// stop ends perf stat and returns its counts.
func (ps *perfStat) stop() (syscalls, switches float64, err error) {
	ps.cmd.Process.Signal(os.Interrupt)
	ps.cmd.Wait()
	found := 0
	for _, l := range strings.Split(ps.out.String(), "\n") {
		f := strings.Split(l, ",")
		if len(f) < 3 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		switch f[2] {
		case "raw_syscalls:sys_enter":
			syscalls = v
			found++
		case "context-switches":
			switches = v
			found++
		}
	}
	if found != 2 {
		return 0, 0, fmt.Errorf("perf stat: %s", ps.out.String())
	}
	return syscalls, switches, nil
}

type fioStats struct {
	IOPS float64
	BW   int64   // bytes/s
	P99  float64 // completion latency, ns
	// ClientCPU is fio's user+system time over the run, in % of one core
	// per job (group_reporting averages the jobs).
	ClientCPU float64
}

func parseFio(out []byte, rw string) (fioStats, error) {
	if i := bytes.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	var v struct {
		Jobs []struct {
			Error       int     `json:"error"`
			UsrCPU      float64 `json:"usr_cpu"`
			SysCPU      float64 `json:"sys_cpu"`
			Read, Write struct {
				IOPS    float64 `json:"iops"`
				BW      int64   `json:"bw_bytes"`
				TotalIO int64   `json:"total_ios"`
				Clat    struct {
					Percentile map[string]float64 `json:"percentile"`
				} `json:"clat_ns"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		return fioStats{}, err
	}
	if len(v.Jobs) != 1 {
		return fioStats{}, fmt.Errorf("%d job reports, want 1 (group_reporting)", len(v.Jobs))
	}
	j := v.Jobs[0]
	if j.Error != 0 {
		return fioStats{}, fmt.Errorf("fio job error %d", j.Error)
	}
	s := j.Read
	if strings.Contains(rw, "write") {
		s = j.Write
	}
	if s.TotalIO == 0 {
		return fioStats{}, errors.New("no I/O done")
	}
	return fioStats{IOPS: s.IOPS, BW: s.BW, P99: s.Clat.Percentile["99.000000"], ClientCPU: j.UsrCPU + j.SysCPU}, nil
}

// runNbdcopy copies the whole export to null: with nbdcopy's defaults
// (multi-conn when the server offers it, which both do).
func (r *runner) runNbdcopy(c *Config, w *Workload, d Daemon, p *process) error {
	cpu0, err := p.cpu()
	if err != nil {
		return err
	}
	t0 := time.Now()
	if err := run(r.ctx, "nbdcopy", p.uri, "null:"); err != nil {
		return err
	}
	el := time.Since(t0)
	cpu1, err := p.cpu()
	if err != nil {
		return err
	}
	gib := float64(r.o.Size) / (1 << 30)
	r.res.add(c.Name, throughputMetric(w), d, sample{el.Seconds(), (cpu1 - cpu0).Seconds() / gib})
	return nil
}

// convertCase is one qemu-img/blockd-img convert, with the same arguments
// for both tools.
type convertCase struct {
	name, label string
	args        func(im *images, out string) []string
	needsQcow2  bool // skipped unless blockd-img has the qcow2 driver
}

var convertCases = []convertCase{
	{name: "raw-to-raw", label: "convert raw → raw", args: func(im *images, out string) []string {
		return []string{"convert", "-f", "raw", "-O", "raw", im.path("raw.img"), out}
	}},
	{name: "qcow2-to-raw", label: "convert qcow2 → raw", needsQcow2: true, args: func(im *images, out string) []string {
		return []string{"convert", "-f", "qcow2", "-O", "raw", im.path("src.qcow2"), out}
	}},
	{name: "luks-to-raw", label: "convert luks → raw (decrypt)", args: func(im *images, out string) []string {
		return []string{"convert", "--object", "secret,id=s0,file=" + im.pw(), "--image-opts",
			"driver=luks,key-secret=s0,file.filename=" + im.path("luks.img"), "-O", "raw", out}
	}},
	{name: "raw-to-luks", label: "convert raw → luks (encrypt, iter-time=100)", args: func(im *images, out string) []string {
		return []string{"convert", "--object", "secret,id=s0,file=" + im.pw(), "-f", "raw", im.path("raw.img"),
			"-O", "luks", "-o", "key-secret=s0,iter-time=100", out}
	}},
}

// runConvert times qemu-img convert against blockd-img convert.
func (r *runner) runConvert() error {
	if err := r.imgs.raw(r.ctx); err != nil {
		return err
	}
	if err := r.imgs.luks(r.ctx); err != nil {
		return err
	}
	if r.qcow2 {
		if err := r.imgs.srcQcow2(r.ctx); err != nil {
			return err
		}
	} else {
		r.res.Notes = append(r.res.Notes, "convert qcow2 → raw: skipped, blockd has no qcow2 driver")
	}
	out := r.imgs.path("convert-out.img")
	defer os.Remove(out)
	for rep := 1; rep <= r.o.Reps; rep++ {
		r.logf("convert: repetition %d of %d", rep, r.o.Reps)
		for _, cc := range convertCases {
			if cc.needsQcow2 && !r.qcow2 {
				continue
			}
			tools := []Daemon{QSD, Blockd}
			if rep%2 == 0 {
				tools = []Daemon{Blockd, QSD}
			}
			for _, d := range tools {
				bin := "qemu-img"
				if d == Blockd {
					bin = r.img
				}
				var cmd *exec.Cmd
				var el time.Duration
				for try := 0; ; try++ {
					os.Remove(out)
					cmd = exec.CommandContext(r.ctx, bin, cc.args(r.imgs, out)...)
					var eb bytes.Buffer
					cmd.Stdout, cmd.Stderr = &eb, &eb
					t0 := time.Now()
					err := cmd.Run()
					el = time.Since(t0)
					if err == nil {
						break
					}
					// qemu-img sometimes fails to time its PBKDF on busy
					// machines ("Unable to get accurate CPU usage"): that
					// attempt is not a measurement; try again.
					if try < 5 && strings.Contains(eb.String(), "Unable to get accurate CPU usage") {
						continue
					}
					return fmt.Errorf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(cc.args(r.imgs, out), " "), err, eb.String())
				}
				cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
				m := &Metric{Name: cc.name, Label: cc.label, Unit: "s", LowerBetter: true, CPUUnit: "CPU s"}
				r.res.add("convert", m, d, sample{el.Seconds(), cpu.Seconds()})
			}
		}
	}
	return nil
}
