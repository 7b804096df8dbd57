package secrets

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// addWithin adds o to a new Store and fails the test if that takes longer
// than a few seconds (an unbounded read of /dev/zero would go on until the
// process runs out of memory).
func addWithin(t *testing.T, o Options) (*Store, error) {
	t.Helper()
	var s Store
	done := make(chan error, 1)
	go func() { done <- s.Add(o) }()
	select {
	case err := <-done:
		return &s, err
	case <-time.After(10 * time.Second):
		t.Fatalf("adding a secret from %s did not finish in 10 s", *o.File)
		return nil, nil
	}
}

// mkfifo makes a FIFO in a test directory.
func mkfifo(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	return p
}

// TestFileBounds checks that a secret file is read only when it is a
// regular file or a FIFO, and never past MaxFileSize bytes.
func TestFileBounds(t *testing.T) {
	dir := t.TempDir()
	content := func(n int) []byte { return bytes.Repeat([]byte{'k'}, n) }
	file := func(name string, n int) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content(n), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	notAllowed := func(p string) string {
		return "Unable to read " + p + ": secret file “" + p + "” is not a regular file or FIFO"
	}
	tooLarge := func(p string) string {
		return "Unable to read " + p + ": secret file “" + p + "” is larger than " + strconv.Itoa(MaxFileSize) + " bytes"
	}

	sparse := filepath.Join(dir, "sparse")
	if f, err := os.Create(sparse); err != nil {
		t.Fatal(err)
	} else {
		f.Truncate(1 << 40)
		f.Close()
	}
	zeroLink := filepath.Join(dir, "zero-link")
	if err := os.Symlink("/dev/zero", zeroLink); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	tests := []struct {
		name, path string
		want       []byte // the secret, when err is ""
		err        string
	}{
		{"dev-zero", "/dev/zero", nil, notAllowed("/dev/zero")},
		{"dev-null", "/dev/null", nil, notAllowed("/dev/null")},
		{"symlink to dev-zero", zeroLink, nil, notAllowed(zeroLink)},
		{"unix socket", sock, nil, notAllowed(sock)},
		{"empty", file("empty", 0), []byte{}, ""},
		{"at the limit", file("max", MaxFileSize), content(MaxFileSize), ""},
		{"one byte over", file("over", MaxFileSize+1), nil, tooLarge(filepath.Join(dir, "over"))},
		{"sparse 1 TiB", sparse, nil, tooLarge(sparse)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := addWithin(t, Options{ID: "s", File: ptr(tc.path)})
			if tc.err != "" {
				if err == nil || err.Error() != tc.err {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				if s.Has("s") {
					t.Fatal("refused secret was added")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := s.Get("s")
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("secret is %d bytes, want %d", len(got), len(tc.want))
			}
		})
	}
}

// TestFileFIFO checks that a passphrase piped through a FIFO is read (the
// open waits for the writer, as in QEMU) and that a writer that never
// stops is cut off after MaxFileSize bytes.
func TestFileFIFO(t *testing.T) {
	t.Run("passphrase", func(t *testing.T) {
		p := mkfifo(t)
		go func() {
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				return
			}
			time.Sleep(50 * time.Millisecond) // the reader waits for data too
			f.Write([]byte("pass"))
			f.Write([]byte("phrase\n"))
			f.Close()
		}()
		s, err := addWithin(t, Options{ID: "s", File: ptr(p)})
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := s.Get("s"); string(got) != "passphrase\n" {
			t.Fatalf("secret %q, want %q", got, "passphrase\n")
		}
	})
	t.Run("endless writer", func(t *testing.T) {
		p := mkfifo(t)
		wrote := make(chan int, 1)
		go func() {
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				wrote <- 0
				return
			}
			defer f.Close()
			buf := make([]byte, 4096)
			total := 0
			for {
				n, err := f.Write(buf)
				total += n
				if err != nil {
					wrote <- total
					return
				}
			}
		}()
		_, err := addWithin(t, Options{ID: "s", File: ptr(p)})
		want := "Unable to read " + p + ": secret file “" + p + "” is larger than " + strconv.Itoa(MaxFileSize) + " bytes"
		if err == nil || err.Error() != want {
			t.Fatalf("error %v, want %q", err, want)
		}
		// Once the reader is gone the writer gets EPIPE; what it managed to
		// write is at most what was read plus one pipe buffer.
		select {
		case n := <-wrote:
			if n > MaxFileSize+1+1<<20 {
				t.Errorf("writer wrote %d bytes", n)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the FIFO writer was not cut off")
		}
	})
}
