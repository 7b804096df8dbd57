package nbd

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// BenchmarkReadVsNbdcopy reads a 256 MiB raw export of qemu-nbd through
// the driver (16 readers of 1 MiB, one connection, as a mirror job would)
// and with nbdcopy to /dev/null from the same server, and reports the
// driver's throughput as a ratio of nbdcopy's.
func BenchmarkReadVsNbdcopy(b *testing.B) {
	testutil.NeedTool(b, "nbdcopy")
	const size = 256 * mib
	img := filepath.Join(b.TempDir(), "disk.img")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(img, data, 0o644); err != nil {
		b.Fatal(err)
	}
	sock := filepath.Join(b.TempDir(), "qemu-nbd.sock")
	startPeerB(b, sock, "qemu-nbd", "-k", sock, "-f", "raw", "-t", "-e", "8", "-r", img)
	c := openNBD(b, map[string]any{"server": map[string]any{"type": "unix", "path": sock}, "read-only": true})
	defer c.Close()
	ctx := context.Background()

	driver := func() time.Duration {
		start := time.Now()
		var wg sync.WaitGroup
		next := make(chan int64, 16)
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, mib)
				for off := range next {
					if err := c.ReadAt(ctx, buf, off); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		for off := int64(0); off < size; off += mib {
			next <- off
		}
		close(next)
		wg.Wait()
		return time.Since(start)
	}
	nbdcopy := func() time.Duration {
		start := time.Now()
		if out, err := exec.Command("nbdcopy", uri(sock, ""), "null:").CombinedOutput(); err != nil {
			b.Fatalf("nbdcopy: %v: %s", err, out)
		}
		return time.Since(start)
	}
	b.SetBytes(size)
	b.ResetTimer()
	var td, tc time.Duration
	for range b.N {
		td += driver()
		b.StopTimer()
		tc += nbdcopy()
		b.StartTimer()
	}
	b.ReportMetric(float64(size)*float64(b.N)/td.Seconds()/(1<<20), "driver-MiB/s")
	b.ReportMetric(float64(size)*float64(b.N)/tc.Seconds()/(1<<20), "nbdcopy-MiB/s")
	b.ReportMetric(tc.Seconds()/td.Seconds(), "ratio")
}

func startPeerB(b *testing.B, sock, name string, args ...string) {
	b.Helper()
	testutil.NeedTool(b, name)
	cmd := exec.Command(name, args...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(sock); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatalf("%s did not listen", name)
}
