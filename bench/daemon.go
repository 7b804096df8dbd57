package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Daemon names a server under test.
type Daemon string

const (
	QSD    Daemon = "qsd"
	Blockd Daemon = "blockd"
	// NBDKit is nbdkit with its file plugin (and luks filter): a third
	// peer on the setups it can serve (Config.NBDKit).
	NBDKit Daemon = "nbdkit"
)

// Daemons lists the servers in report order.
var Daemons = []Daemon{QSD, Blockd, NBDKit}

// process is a running daemon.
type process struct {
	d     Daemon
	cmd   *exec.Cmd
	sock  string
	uri   string
	log   *bytes.Buffer
	pprof string // blockd's pprof socket when profiling
	done  chan struct{}
}

// start launches d with c's arguments and an NBD export of node "disk",
// and waits until the export answers. nbdkit serves its one disk under any
// export name, so the same URI works for all.
func (r *runner) start(c *Config, d Daemon) (*process, error) {
	sock := filepath.Join(r.dir, string(d)+".sock")
	os.Remove(sock)
	var bin string
	var args []string
	switch d {
	case NBDKit:
		bin = "nbdkit"
		args = cat([]string{"--foreground", "--exit-with-parent", "--unix", sock}, c.NBDKit(r.imgs))
	default:
		args = cat(c.Args(r.imgs), []string{
			"--nbd-server", "addr.type=unix,addr.path=" + sock,
			"--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
		})
		bin = "qemu-storage-daemon"
		if d == Blockd {
			bin = r.blockd
		}
	}
	p := &process{d: d, sock: sock, uri: "nbd+unix:///disk?socket=" + sock, log: &bytes.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if d == Blockd && r.o.ProfileDir != "" {
		p.pprof = filepath.Join(r.dir, "pprof.sock")
		os.Remove(p.pprof)
		p.cmd.Env = append(os.Environ(), profileEnv+"="+p.pprof)
	}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			break
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s %s exited: %v\n%s", bin, strings.Join(args, " "), p.cmd.ProcessState, p.log)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("%s did not open its NBD socket\n%s", bin, p.log)
		}
	}
	// The socket is listening once the export exists; nbdinfo checks
	// that the export answers.
	if err := run(r.ctx, "nbdinfo", "--size", p.uri); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// stop ends the daemon with SIGTERM (all three shut down cleanly on it).
func (p *process) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not exit on SIGTERM", p.d)
	}
}

func (p *process) logTail() string {
	s := p.log.String()
	if len(s) > 2000 {
		s = s[len(s)-2000:]
	}
	return s
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times (100 on every
// Linux architecture Go supports).
const clockTicks = 100

// cpu returns the daemon's user+system CPU time so far.
func (p *process) cpu() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// Fields after the ")" that ends the command name: state is field 3,
	// utime 14, stime 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("bad /proc stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("bad /proc stat")
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// rss returns the daemon's resident set size in bytes.
func (p *process) rss() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// profileEnv names the environment variable with the unix socket on which
// a blockd built with the profile overlay serves net/http/pprof.
const profileEnv = "BLOCKD_BENCH_PPROF"

// profileHook is added to package main of cmd/blockd with go build
// -overlay when profiling, so that the daemon's source stays untouched.
const profileHook = `package main

import (
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"runtime"
)

func init() {
	if a := os.Getenv("` + profileEnv + `"); a != "" {
		runtime.SetMutexProfileFraction(10)
		if l, err := net.Listen("unix", a); err == nil {
			go http.Serve(l, nil)
		}
	}
}
`

// writeProfileOverlay writes the hook and the overlay file naming it, and
// returns the overlay file's path.
func writeProfileOverlay(dir string) (string, error) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "blockd/cmd/blockd").Output()
	if err != nil {
		return "", fmt.Errorf("locating cmd/blockd: %w", err)
	}
	hook := filepath.Join(dir, "benchpprof.go")
	if err := os.WriteFile(hook, []byte(profileHook), 0o644); err != nil {
		return "", err
	}
	target := filepath.Join(strings.TrimSpace(string(out)), "zz_benchpprof.go")
	ov := filepath.Join(dir, "overlay.json")
	js := fmt.Sprintf(`{"Replace":{%q:%q}}`, target, hook)
	return ov, os.WriteFile(ov, []byte(js), 0o644)
}

// fetchProfile GETs a pprof endpoint of p into path.
func (p *process) fetchProfile(ctx context.Context, endpoint, path string) error {
	cl := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", p.pprof)
	}}}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://blockd"+endpoint, nil)
	if err != nil {
		return err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", endpoint, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func (r *runner) saveProfile(p *process, kind, name string) {
	path := filepath.Join(r.o.ProfileDir, name)
	if err := p.fetchProfile(r.ctx, "/debug/pprof/"+kind, path); err != nil {
		r.logf("profile %s: %v", name, err)
	}
}
