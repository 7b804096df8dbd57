package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"blockd/tests/harness"
)

// This file times the block jobs over QMP: block-stream and block-commit
// of the intermediate image of a backing chain base ← mid ← top, the same
// images and the same commands against QSD and blockd. The base is fully
// written (random data), mid holds 1 MiB in every 4 (25 % of the disk),
// top 1 MiB in every 10 (10 %). The stream copies mid's data that top
// does not cover into top (base-node=base); the commit copies mid into
// base (top-node=mid, base-node=base). Each job runs on a daemon started
// for it on fresh copies of the images, and is timed from the command to
// BLOCK_JOB_COMPLETED. The mirror copies the whole chain as top reads it
// (sync=full: 1 GiB of data) into a new qcow2 image of the same size
// added as a node before the job starts, and is completed as soon as it
// is ready.

// chain is one backing-chain setup of the block job rows.
type chain struct {
	Name string
	// BaseFmt is the base's driver (raw or qcow2); mid and top are qcow2.
	BaseFmt string
	// Encrypted: every qcow2 layer is LUKS-encrypted (encrypt.format=luks).
	Encrypted bool
}

// chains are the block job setups, in report order.
var chains = []*chain{
	{Name: "chain-qcow2", BaseFmt: "qcow2"},
	{Name: "chain-raw", BaseFmt: "raw"},
	{Name: "chain-luks", BaseFmt: "qcow2", Encrypted: true},
}

// blockJob is one timed job: its QMP command and arguments.
type blockJob struct {
	Name, Label string
	cmd         string
	args        map[string]any
	// target: a new qcow2 image "tgt" of the chain's size is added
	// before the command, and the job is completed once it is ready.
	target bool
}

var blockJobs = []*blockJob{
	{"stream", "block-stream of mid (25 %) into top", "block-stream",
		map[string]any{"job-id": "job0", "device": "top", "base-node": "base"}, false},
	{"commit", "block-commit of mid (25 %) into base", "block-commit",
		map[string]any{"job-id": "job0", "device": "top", "top-node": "mid", "base-node": "base"}, false},
	{"mirror", "blockdev-mirror sync=full of top (1 GiB) into a new qcow2", "blockdev-mirror",
		map[string]any{"job-id": "job0", "device": "top", "target": "tgt", "sync": "full"}, true},
}

func (b *blockJob) metric() *Metric {
	return &Metric{Name: b.Name, Label: b.Label, Unit: "s", LowerBetter: true, CPUUnit: "CPU s"}
}

// chainFiles are the three images of a chain, base first.
var chainFiles = []string{"base", "mid", "top"}

// makeChain creates c's pristine images under dir/c.Name once.
func (im *images) makeChain(ctx context.Context, c *chain) error {
	dir := im.path(c.Name)
	return im.once(c.Name, func() error {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		base, mid, top := filepath.Join(dir, "base"), filepath.Join(dir, "mid"), filepath.Join(dir, "top")
		secret := []string{"--object", "secret,id=s0,file=" + im.pw()}
		var enc []string
		if c.Encrypted {
			enc = []string{"-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100"}
		}
		switch c.BaseFmt {
		case "raw":
			if err := randomFile(base, im.size, 3); err != nil {
				return err
			}
		default:
			data := filepath.Join(dir, "base.data")
			if err := randomFile(data, im.size, 3); err != nil {
				return err
			}
			args := cat([]string{"convert", "-q"}, secret, []string{"-f", "raw", "-O", "qcow2"}, enc, []string{data, base})
			if err := runPeer(ctx, "qemu-img", args...); err != nil {
				return err
			}
			os.Remove(data)
		}
		// mid and top: 1 MiB written in every 4 and in every 10.
		for _, l := range []struct {
			path, backing, backingFmt string
			every                     int64
			pattern                   string
		}{{mid, base, c.BaseFmt, 4, "0x5a"}, {top, mid, "qcow2", 10, "0xa5"}} {
			args := cat([]string{"create", "-q", "-u"}, secret, []string{"-f", "qcow2", "-b", l.backing, "-F", l.backingFmt},
				enc, []string{l.path, fmt.Sprint(im.size)})
			if err := runPeer(ctx, "qemu-img", args...); err != nil {
				return err
			}
			io := slices.Clone(secret)
			for off := int64(1 << 20); off < im.size; off += l.every << 20 {
				io = append(io, "-c", fmt.Sprintf("write -q -P %s %d 1M", l.pattern, off))
			}
			opts := map[string]any{"driver": "qcow2", "backing": nil, "file": map[string]any{"driver": "file", "filename": l.path}}
			if c.Encrypted {
				opts["encrypt"] = map[string]any{"key-secret": "s0"}
			}
			js, _ := json.Marshal(opts)
			if err := run(ctx, "qemu-io", append(io, "json:"+string(js))...); err != nil {
				return err
			}
		}
		return nil
	})
}

// runPeer is run, retried when qemu-img fails to time its PBKDF on a busy
// machine ("Unable to get accurate CPU usage").
func runPeer(ctx context.Context, name string, args ...string) error {
	var err error
	for try := 0; try < 5; try++ {
		if err = run(ctx, name, args...); err == nil || !strings.Contains(err.Error(), "Unable to get accurate CPU usage") {
			return err
		}
	}
	return err
}

// chainArgs are the daemon arguments that open base, mid and top from
// the images in dir.
func chainArgs(im *images, c *chain, dir string) []string {
	var args []string
	var enc string
	if c.Encrypted {
		args = secretArgs(im)
		enc = ",encrypt.format=luks,encrypt.key-secret=sec0"
	}
	backing := ""
	for i, n := range chainFiles {
		drv, e := "qcow2", enc
		if n == "base" {
			drv = c.BaseFmt
			if drv == "raw" {
				e = ""
			}
		}
		args = append(args, "--blockdev", fmt.Sprintf("driver=file,node-name=f%d,filename=%s", i, filepath.Join(dir, n)),
			"--blockdev", fmt.Sprintf("driver=%s,node-name=%s,file=f%d%s%s", drv, n, i, e, backing))
		backing = ",backing=" + n
	}
	return args
}

// copyFile copies src to dst (a fresh file).
func copyFile(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// runChain times every block job on chain c, Reps times on each daemon,
// alternating which daemon goes first.
func (r *runner) runChain(c *chain) error {
	if err := r.imgs.makeChain(r.ctx, c); err != nil {
		return err
	}
	where := r.dir
	if r.o.JobDir != "" {
		where = r.o.JobDir
	}
	work, err := os.MkdirTemp(where, c.Name+"-work-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	for rep := 1; rep <= r.o.Reps; rep++ {
		order := []Daemon{QSD, Blockd}
		if rep%2 == 0 {
			order = []Daemon{Blockd, QSD}
		}
		for _, j := range blockJobs {
			for _, d := range order {
				if err := r.ctx.Err(); err != nil {
					return err
				}
				r.logf("%s: %s on %s, repetition %d of %d", c.Name, j.Name, d, rep, r.o.Reps)
				s, err := r.runBlockJob(c, j, d, work)
				if err != nil {
					return fmt.Errorf("%s on %s: %w", j.Name, d, err)
				}
				r.res.add(c.Name, j.metric(), d, s)
			}
		}
	}
	return nil
}

// runBlockJob starts d on fresh copies of c's images, runs j and returns
// its wall time and the daemon's CPU time over it.
func (r *runner) runBlockJob(c *chain, j *blockJob, d Daemon, work string) (sample, error) {
	for _, n := range chainFiles {
		if err := copyFile(filepath.Join(work, n), filepath.Join(r.imgs.path(c.Name), n)); err != nil {
			return sample{}, err
		}
	}
	bin := "qemu-storage-daemon"
	if d == Blockd {
		bin = r.blockd
	}
	mon := filepath.Join(work, "mon")
	if err := os.MkdirAll(mon, 0o755); err != nil {
		return sample{}, err
	}
	p, err := harness.Start(bin, mon, chainArgs(r.imgs, c, work)...)
	if err != nil {
		return sample{}, err
	}
	defer p.Kill()
	q, err := p.QMP(60 * time.Second)
	if err != nil {
		return sample{}, err
	}
	defer q.Close()
	q.Timeout = 10 * time.Minute
	if j.target {
		tgt := filepath.Join(work, "tgt")
		if err := runPeer(r.ctx, "qemu-img", "create", "-q", "-f", "qcow2", tgt, fmt.Sprint(r.imgs.size)); err != nil {
			return sample{}, err
		}
		if _, err := q.Exec("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "tgt",
			"file": map[string]any{"driver": "file", "filename": tgt}}); err != nil {
			return sample{}, err
		}
	}
	proc := &process{cmd: p.Cmd}
	cpu0, err := proc.cpu()
	if err != nil {
		return sample{}, err
	}
	t0 := time.Now()
	if _, err := q.Exec(j.cmd, j.args); err != nil {
		return sample{}, err
	}
	if j.target {
		if _, err := q.WaitEvent("BLOCK_JOB_READY", nil, 10*time.Minute); err != nil {
			return sample{}, err
		}
		if _, err := q.Exec("block-job-complete", map[string]any{"device": "job0"}); err != nil {
			return sample{}, err
		}
	}
	ev, err := q.WaitEvent("BLOCK_JOB_COMPLETED", nil, 10*time.Minute)
	el := time.Since(t0)
	if err != nil {
		return sample{}, err
	}
	cpu1, err := proc.cpu()
	if err != nil {
		return sample{}, err
	}
	if e, ok := ev.Data["error"]; ok {
		return sample{}, fmt.Errorf("job failed: %v", e)
	}
	if ev.Data["offset"] != ev.Data["len"] {
		return sample{}, fmt.Errorf("job completed at %v of %v", ev.Data["offset"], ev.Data["len"])
	}
	if err := p.Stop(20 * time.Second); err != nil && !strings.Contains(err.Error(), "signal") {
		return sample{}, err
	}
	return sample{el.Seconds(), (cpu1 - cpu0).Seconds()}, nil
}
