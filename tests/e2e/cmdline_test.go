package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockd/nbd/attach"
)

// TestCommandLineErrors checks the qemu-storage-daemon style of option
// errors: "blockd: --opt <arg>: <error>" and exit status 1.
func TestCommandLineErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--blockdev", "driver=bogus,node-name=x"}, "blockd: --blockdev driver=bogus,node-name=x: Parameter 'driver' does not accept value 'bogus'"},
		{[]string{"--blockdev", "driver=file,filename=" + img}, "'node-name' must be specified for the root node"},
		{[]string{"--blockdev", "driver=file,node-name=f,filename=/nonexistent"}, "Could not open '/nonexistent': No such file or directory"},
		{[]string{"--object", "secret,id=s0"}, "blockd: --object secret,id=s0: Either 'file' or 'data' must be provided"},
		{[]string{"--export", "type=nbd,id=e,node-name=f"}, "NBD server not running"},
		{[]string{"--monitor", "chardev=nosuch"}, `chardev "nosuch" not found`},
		{[]string{"--bogus"}, "unrecognized option '--bogus'"},
		{[]string{"--blockdev", "driver=file,node-name=f,filename=" + img, "--nbd-server", "addr.type=unix,addr.path=" + filepath.Join(dir, "s"),
			"--export", "type=nbd,id=e,node-name=f", "--export", "type=nbd,id=e,node-name=f"}, "Block export id 'e' is already in use"},
	} {
		out, err := exec.Command(blockdBin, tc.args...).CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 1 {
			t.Errorf("%v: exit %v, want 1\n%s", tc.args, err, out)
			continue
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("%v: output %q does not contain %q", tc.args, out, tc.want)
		}
	}
}

// TestAttachWithoutKernelSupport: where the kernel has no nbd driver,
// --attach fails with a clear message instead of hanging.
func TestAttachWithoutKernelSupport(t *testing.T) {
	if attach.Available() == nil {
		t.Skip("this kernel has nbd support; attach is exercised by the nbd/attach tests")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "a.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
	out, err := exec.Command(blockdBin, "--blockdev", "driver=file,node-name=f,filename="+img,
		"--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "s"),
		"--export", "type=nbd,id=e,node-name=f", "--attach", "export=f").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "kernel nbd support unavailable") {
		t.Fatalf("attach: %v\n%s", err, out)
	}
}

// TestPidfileAndDaemonize starts blockd with --daemonize and --pidfile,
// then stops it with SIGTERM through the PID file.
func TestPidfileAndDaemonize(t *testing.T) {
	dir := t.TempDir()
	pid := filepath.Join(dir, "pid")
	sock := filepath.Join(dir, "qmp.sock")
	out, err := exec.Command(blockdBin, "--daemonize", "--pidfile", pid, "--qmp", "unix:"+sock).CombinedOutput()
	if err != nil {
		t.Fatalf("daemonize: %v\n%s", err, out)
	}
	b, err := os.ReadFile(pid)
	if err != nil {
		t.Fatalf("pidfile: %v", err)
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("QMP socket missing after the parent exited: %v", err)
	}
	p := strings.TrimSpace(string(b))
	if err := exec.Command("kill", p).Run(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(pid); os.IsNotExist(err) {
			return
		}
		exec.Command("sleep", "0.05").Run()
	}
	t.Fatal("pidfile not removed after SIGTERM")
}
