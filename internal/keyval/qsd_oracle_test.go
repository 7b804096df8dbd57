package keyval

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// qsd returns the path of qemu-storage-daemon, skipping the test when it
// is not installed (failing instead when CI=true).
func qsd(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("qemu-storage-daemon not found")
		}
		t.Skip("qemu-storage-daemon not installed")
	}
	return path
}

// runQSD runs qemu-storage-daemon with one option and returns what it
// printed. A failing option follows, so that the daemon exits at once
// even when the option under test succeeds.
func runQSD(t *testing.T, path, opt, arg string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, opt+"="+arg, "--blockdev=driver=bogus").CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("qemu-storage-daemon %s=%q: %v", opt, arg, err)
	}
	return strings.TrimSuffix(string(out), bogusError)
}

// bogusError is what the trailing failing option prints.
const bogusError = "qemu-storage-daemon: --blockdev=driver=bogus: Parameter 'driver' does not accept value 'bogus'\n"

// keyvalErrorTexts are the beginnings of errors the keyval and JSON parsers
// produce, as opposed to later errors about the parsed options.
var keyvalErrorTexts = []string{
	"Invalid parameter '", "is too long", "used inconsistently", "' missing",
	"Expected '='", "Help is not available", "JSON ", "Expecting ",
}

// TestQSDKeyval checks the table inputs against qemu-storage-daemon's
// --blockdev (implied key "driver"): where Parse fails, QEMU must print the
// same error; where it succeeds, QEMU must not fail in its parser.
func TestQSDKeyval(t *testing.T) {
	path := qsd(t)
	var inputs []string
	for _, tt := range parseTests {
		if tt.implied == "" || tt.implied == "driver" {
			inputs = append(inputs, tt.in)
		}
	}
	for _, tt := range jsonTests {
		if !strings.ContainsRune(tt.in, 0) && len(tt.in) < 4096 {
			inputs = append(inputs, tt.in)
		}
	}
	compared := 0
	for _, in := range inputs {
		_, err := Parse(in, "driver")
		out := runQSD(t, path, "--blockdev", in)
		msg := strings.TrimSuffix(strings.TrimPrefix(out, "qemu-storage-daemon: --blockdev="+in+": "), "\n")
		if err != nil {
			if msg != err.Error() {
				t.Errorf("%q: qemu-storage-daemon says %q, Parse %q", in, msg, err)
			}
			compared++
			continue
		}
		for _, p := range keyvalErrorTexts {
			if strings.Contains(msg, p) {
				t.Errorf("%q: qemu-storage-daemon says %q, Parse succeeds", in, msg)
				break
			}
		}
	}
	t.Logf("%d inputs, %d error texts compared", len(inputs), compared)
}

// TestQSDChardev checks QemuOpts warnings and errors against --chardev.
func TestQSDChardev(t *testing.T) {
	path := qsd(t)
	sock := t.TempDir() + "/s"
	for _, in := range []string{
		"socket,id=c,path=" + sock + ",server,nowait",
		"socket,id=c,path=" + sock + ",nodelay,server=on,wait=off",
		"socket,id=c,path=" + sock + ",delay,server=on,wait=off",
		"socket,id=666,path=" + sock,
		"socket,id=,path=" + sock,
		"socket,id=a/b,path=" + sock,
	} {
		o, err := ParseQemuOptsList(in, "backend")
		out := runQSD(t, path, "--chardev", in)
		prefix := "qemu-storage-daemon: --chardev=" + in + ": "
		var want strings.Builder
		if err != nil {
			want.WriteString(prefix + err.Error() + "\n")
			want.WriteString("Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n")
		} else {
			for _, w := range o.Warnings {
				want.WriteString(prefix + "warning: " + w + "\n")
			}
		}
		if out != want.String() {
			t.Errorf("%q: qemu-storage-daemon printed\n%s\nexpected\n%s", in, out, want.String())
		}
	}
}
