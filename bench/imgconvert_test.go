package bench

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// This file times `blockd-img convert` against `qemu-img convert` on the
// same 1 GiB images in one run: qcow2 → raw (decompressing nothing,
// following L2 tables) and raw → luks (encrypting, LUKS1 with
// iter-time=100 so that the key derivation is a small part), plus raw →
// raw. Each iteration runs both tools on every case, alternating which
// goes first; the reported metrics are the medians in seconds and their
// ratio blockd-img/qemu-img (below 1: blockd-img is faster).
//
//	go test ./bench -run '^$' -bench ImgConvert -benchtime 3x

const icSize = 1 << 30

var (
	icOnce sync.Once
	icBin  string
	icErr  error
)

// icBuild builds blockd-img once per test binary.
func icBuild(b *testing.B) string {
	icOnce.Do(func() {
		dir, err := os.MkdirTemp("", "blockd-img-bench")
		if err != nil {
			icErr = err
			return
		}
		icBin = filepath.Join(dir, "blockd-img")
		out, err := exec.Command("go", "build", "-o", icBin, "blockd/cmd/blockd-img").CombinedOutput()
		if err != nil {
			icErr = fmt.Errorf("building blockd-img: %v\n%s", err, out)
		}
	})
	if icErr != nil {
		b.Fatal(icErr)
	}
	return icBin
}

// icRun runs a command and returns its wall time. qemu-img's LUKS key
// derivation benchmark sometimes fails on these machines ("Unable to get
// accurate CPU usage"); such runs are retried.
func icRun(b *testing.B, dir, prog string, args ...string) time.Duration {
	for try := 0; ; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		cmd := exec.CommandContext(ctx, prog, args...)
		cmd.Dir = dir
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		start := time.Now()
		err := cmd.Run()
		d := time.Since(start)
		cancel()
		if err == nil {
			return d
		}
		if try < testutil.PeerRetries && testutil.PeerFlake(out.String()) {
			continue
		}
		b.Fatalf("%s %s: %v\n%s", prog, strings.Join(args, " "), err, out.String())
	}
}

// icImages makes the source images in dir: src.raw (1 GiB: 3/4 random
// data with a zero MiB in every 16, then a hole), src.qcow2 from it, and
// the passphrase file.
func icImages(b *testing.B, dir string) {
	f, err := os.Create(filepath.Join(dir, "src.raw"))
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.NewChaCha8([32]byte{7})
	buf := make([]byte, 1<<20)
	for i := 0; i < icSize*3/4>>20; i++ {
		if i%16 == 15 {
			clear(buf)
		} else {
			_, _ = rng.Read(buf)
		}
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Truncate(icSize); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pw"), []byte("bench-passphrase"), 0o600); err != nil {
		b.Fatal(err)
	}
	icRun(b, dir, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2")
}

type icCase struct {
	name string
	args []string
	// verify checks out against the source after the first run.
	verify []string
}

var icCases = []icCase{
	{"qcow2-to-raw", []string{"convert", "-f", "qcow2", "-O", "raw", "src.qcow2", "out"},
		[]string{"compare", "-f", "raw", "-F", "raw", "src.raw", "out"}},
	{"raw-to-luks", []string{"convert", "--object", "secret,id=s0,file=pw", "-f", "raw", "-O", "luks",
		"-o", "key-secret=s0,iter-time=100", "src.raw", "out"},
		[]string{"compare", "--object", "secret,id=s0,file=pw", "--image-opts",
			"driver=raw,file.filename=src.raw", "driver=luks,key-secret=s0,file.filename=out"}},
	{"raw-to-raw", []string{"convert", "-f", "raw", "-O", "raw", "src.raw", "out"},
		[]string{"compare", "-f", "raw", "-F", "raw", "src.raw", "out"}},
}

func icMedian(v []time.Duration) float64 {
	s := append([]time.Duration(nil), v...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2].Seconds()
}

// BenchmarkImgConvert reports, per case, s-qemu-img, s-blockd-img and
// ratio (blockd-img/qemu-img) as metrics.
func BenchmarkImgConvert(b *testing.B) {
	testutil.NeedTool(b, "qemu-img")
	bin := icBuild(b)
	base := os.TempDir()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		base = "/dev/shm" // tmpfs: the tools, not the disk, are measured
	}
	dir, err := os.MkdirTemp(base, "imgconvert")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	icImages(b, dir)
	tools := map[string]string{"qemu-img": "qemu-img", "blockd-img": bin}
	times := map[string]map[string][]time.Duration{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		order := []string{"qemu-img", "blockd-img"}
		if i%2 == 1 {
			order[0], order[1] = order[1], order[0]
		}
		for _, c := range icCases {
			if times[c.name] == nil {
				times[c.name] = map[string][]time.Duration{}
			}
			for _, tool := range order {
				_ = os.Remove(filepath.Join(dir, "out"))
				times[c.name][tool] = append(times[c.name][tool], icRun(b, dir, tools[tool], c.args...))
				if i == 0 {
					b.StopTimer()
					icRun(b, dir, "qemu-img", c.verify...)
					b.StartTimer()
				}
			}
		}
	}
	b.StopTimer()
	_ = os.Remove(filepath.Join(dir, "out"))
	for _, c := range icCases {
		q, m := icMedian(times[c.name]["qemu-img"]), icMedian(times[c.name]["blockd-img"])
		b.ReportMetric(q, "s-qemu-img-"+c.name)
		b.ReportMetric(m, "s-blockd-img-"+c.name)
		b.ReportMetric(m/q, "ratio-"+c.name)
	}
}
