package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// passphrase unlocks every LUKS image of a run.
const passphrase = "blockd-bench-pass"

// images makes the disk images of a run, each once.
type images struct {
	dir  string
	size int64
	log  func(format string, args ...any)
	made map[string]bool // image names already made
}

func (im *images) path(name string) string { return filepath.Join(im.dir, name) }

// pw is the passphrase file every secret object reads.
func (im *images) pw() string { return im.path("pw") }

func (im *images) common(context.Context) error {
	im.made = map[string]bool{}
	return os.WriteFile(im.pw(), []byte(passphrase), 0o600)
}

// once runs make for an image name the first time it is asked for.
func (im *images) once(name string, make func() error) error {
	if im.made[name] {
		return nil
	}
	start := time.Now()
	if err := make(); err != nil {
		return fmt.Errorf("making %s: %w", name, err)
	}
	im.log("made %s in %.1fs", name, time.Since(start).Seconds())
	im.made[name] = true
	return nil
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// randomFile writes size pseudo-random bytes, so that the file is fully
// allocated and no reader can skip zeroes.
func randomFile(path string, size int64, seed uint64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), size-off)]
		_, _ = rng.Read(b)
		if _, err := f.Write(b); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// raw is raw.img, filled with random data.
func (im *images) raw(context.Context) error {
	return im.once("raw.img", func() error { return randomFile(im.path("raw.img"), im.size, 1) })
}

// luks is luks.img: LUKS1 (the only version QSD 7.2 reads), embedded
// header, aes-256-xts-plain64, created by qemu-img with the payload fully
// allocated.
func (im *images) luks(ctx context.Context) error {
	return im.once("luks.img", func() error {
		args := []string{"create", "-q", "-f", "luks", "--object", "secret,id=s0,file=" + im.pw(),
			"-o", "key-secret=s0,iter-time=100,preallocation=full", im.path("luks.img"), fmt.Sprint(im.size)}
		var err error
		// qemu-img sometimes fails to measure the PBKDF speed on busy
		// machines ("Unable to get accurate CPU usage"): retry.
		for try := 0; try < 3; try++ {
			if err = run(ctx, "qemu-img", args...); err == nil {
				return nil
			}
		}
		return err
	})
}

// detached is luks-data.img (random data) with the LUKS1 header
// luks-hdr.img made by cryptsetup: the same cipher and key size as
// luks.img, payload offset 0.
func (im *images) detached(ctx context.Context) error {
	return im.once("luks-data.img", func() error {
		if err := randomFile(im.path("luks-data.img"), im.size, 2); err != nil {
			return err
		}
		os.Remove(im.path("luks-hdr.img"))
		return run(ctx, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--cipher", "aes-xts-plain64",
			"--key-size", "512", "--hash", "sha256", "--iter-time", "100", "--key-file", im.pw(),
			"--header", im.path("luks-hdr.img"), im.path("luks-data.img"))
	})
}

// qcow2 creates name as a qcow2 image with the given preallocation.
func (im *images) qcow2(ctx context.Context, name, prealloc string) error {
	os.Remove(im.path(name))
	return run(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation="+prealloc,
		im.path(name), fmt.Sprint(im.size))
}

// luksQcow2 is luks.qcow2: luks.img's bytes in a qcow2 container, for luks
// over qcow2.
func (im *images) luksQcow2(ctx context.Context) error {
	if err := im.luks(ctx); err != nil {
		return err
	}
	return im.once("luks.qcow2", func() error {
		return run(ctx, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-S", "0",
			im.path("luks.img"), im.path("luks.qcow2"))
	})
}

// srcQcow2 is src.qcow2: raw.img's data converted to qcow2 by qemu-img,
// the source of the qcow2 → raw convert.
func (im *images) srcQcow2(ctx context.Context) error {
	if err := im.raw(ctx); err != nil {
		return err
	}
	return im.once("src.qcow2", func() error {
		return run(ctx, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", im.path("raw.img"), im.path("src.qcow2"))
	})
}
