// Package harness has what blockd's reliability and security tests share:
// building and running the blockd binary, a QMP client that records every
// byte it receives and never blocks on events, and a small NBD client
// written from the protocol document (simple replies, pipelined requests,
// per-request timeouts), so that a hung daemon fails a test instead of
// hanging it.
package harness

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Build compiles blockd into dir and returns the binary's path.
func Build(dir string) (string, error) {
	bin := filepath.Join(dir, "blockd")
	out, err := exec.Command("go", "build", "-o", bin, "blockd/cmd/blockd").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("building blockd: %v\n%s", err, out)
	}
	return bin, nil
}

// syncBuffer is a bytes.Buffer safe for the process's output copier and
// the test to use at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Proc is a running blockd process with a QMP monitor socket.
type Proc struct {
	Dir     string // working directory for sockets
	QMPPath string
	Cmd     *exec.Cmd

	logs   *syncBuffer
	exited chan struct{}
	err    error // from Wait, valid once exited is closed
}

// Start runs bin with a QMP monitor on Dir/qmp.sock followed by args. It
// does not wait for the daemon to be ready; QMP does.
func Start(bin, dir string, args ...string) (*Proc, error) {
	sock := filepath.Join(dir, "qmp.sock")
	all := append([]string{"--chardev", "socket,id=hm0,path=" + sock + ",server=on,wait=off", "--monitor", "chardev=hm0"}, args...)
	cmd := exec.Command(bin, all...)
	p := &Proc{Dir: dir, QMPPath: sock, Cmd: cmd, logs: &syncBuffer{}, exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// Logs returns everything the process wrote so far.
func (p *Proc) Logs() string { return p.logs.String() }

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Done is closed when the process has ended.
func (p *Proc) Done() <-chan struct{} { return p.exited }

// Kill sends SIGKILL and waits for the process to end.
func (p *Proc) Kill() {
	_ = p.Cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// Stop sends SIGTERM and waits up to timeout for a clean exit; then it
// kills the process and reports the failure.
func (p *Proc) Stop(timeout time.Duration) error {
	if p.Exited() {
		return p.exitError()
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return p.exitError()
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("blockd did not exit within %v of SIGTERM", timeout)
	}
}

func (p *Proc) exitError() error {
	if p.err != nil {
		return fmt.Errorf("blockd: %w", p.err)
	}
	return nil
}

// QMP connects to the process's monitor, retrying until timeout while the
// daemon starts.
func (p *Proc) QMP(timeout time.Duration) (*QMP, error) {
	deadline := time.Now().Add(timeout)
	for {
		q, err := DialQMP(p.QMPPath, 5*time.Second)
		if err == nil {
			return q, nil
		}
		if p.Exited() {
			return nil, fmt.Errorf("blockd exited: %v\n%s", p.err, p.Logs())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("blockd monitor not ready after %v: %v\n%s", timeout, err, p.Logs())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Daemon is a Proc bound to a test: it fails the test on errors and stops
// the daemon (SIGTERM, checking that it exits) at cleanup.
type Daemon struct {
	*Proc
	T   testing.TB
	Mon *QMP
}

// StartDaemon starts blockd for t in a fresh temporary directory and
// connects a monitor.
func StartDaemon(t testing.TB, bin string, args ...string) *Daemon {
	t.Helper()
	return StartDaemonIn(t, bin, t.TempDir(), args...)
}

// StartDaemonIn is StartDaemon with a given directory.
func StartDaemonIn(t testing.TB, bin, dir string, args ...string) *Daemon {
	t.Helper()
	p, err := Start(bin, dir, args...)
	if err != nil {
		t.Fatal(err)
	}
	d := &Daemon{Proc: p, T: t}
	t.Cleanup(func() {
		if d.Mon != nil {
			d.Mon.Close()
		}
		if err := p.Stop(10 * time.Second); err != nil && !errors.Is(err, os.ErrProcessDone) {
			t.Errorf("%v\n%s", err, p.Logs())
		}
	})
	q, err := p.QMP(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	d.Mon = q
	return d
}

// Must runs a command that has to succeed.
func (d *Daemon) Must(cmd string, args any) []byte {
	d.T.Helper()
	return Must(d.T, d.Mon, cmd, args)
}

// MustFail runs a command that has to fail with an error containing want.
func (d *Daemon) MustFail(cmd string, args any, want string) {
	d.T.Helper()
	MustFail(d.T, d.Mon, cmd, args, want)
}
