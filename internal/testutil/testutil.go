// Package testutil has helpers shared by blockd's tests.
package testutil

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// NeedTool returns the path of a peer tool. When it is missing the test is
// skipped, except under CI=true, where a missing peer is a failure.
func NeedTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("peer tool %s is missing (CI=true): %v", name, err)
		}
		t.Skipf("peer tool %s is missing", name)
	}
	return p
}

// Run runs a command and fails the test with its output on error.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	NeedTool(t, name)
	out, err := exec.CommandContext(context.Background(), name, args...).CombinedOutput()
	for try := 0; err != nil && try < PeerRetries && PeerFlake(string(out)); try++ {
		out, err = exec.CommandContext(context.Background(), name, args...).CombinedOutput()
	}
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Tree parses JSON into the generic tree the graph and QMP decode.
func Tree(t testing.TB, s string) map[string]any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var v map[string]any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("bad JSON %s: %v", s, err)
	}
	return v
}

// RunErr runs a peer tool (which must exist) and returns its output and
// error without failing the test.
func RunErr(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	for try := 0; err != nil && try < PeerRetries && PeerFlake(string(out)); try++ {
		out, err = exec.Command(name, args...).CombinedOutput()
	}
	return string(out), err
}

// PeerRetries is how many times a command that failed with PeerFlake is
// run again.
const PeerRetries = 10

// PeerFlake reports output of a QEMU tool that failed for a reason of the
// machine, not of the test: QEMU times its PBKDF2 iteration count with
// getrusage and gives up with "Unable to get accurate CPU usage" when a
// loaded machine reports no CPU time for the timed loop. Nothing was
// written when it says so; running the command again is safe.
func PeerFlake(out string) bool {
	return strings.Contains(out, "Unable to get accurate CPU usage")
}
