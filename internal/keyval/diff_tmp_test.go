package keyval

import (
	"math/rand"
	"os/exec"
	"strings"
	"testing"
)

func TestTmpDiff(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	alpha := []string{"a", "b", ".", "0", "1", "=", ",", ",,", "?", "help", "_", "-", "x=", "01", "__a_", "{", "}", "\"", ":", "[", "]", " "}
	bad := 0
	for n := 0; n < 1500; n++ {
		var b strings.Builder
		k := 1 + r.Intn(8)
		for i := 0; i < k; i++ {
			b.WriteString(alpha[r.Intn(len(alpha))])
		}
		in := b.String()
		if strings.HasPrefix(in, "-") {
			continue
		}
		out, _ := exec.Command("timeout", "2", "qemu-storage-daemon", "--blockdev", in).CombinedOutput()
		qemu := strings.TrimSpace(string(out))
		qemu = strings.TrimPrefix(qemu, "qemu-storage-daemon: --blockdev "+in+": ")
		_, err := Parse(in, "driver")
		if err != nil {
			if qemu != err.Error() {
				t.Errorf("%q: qemu %q, ours %q", in, qemu, err)
				bad++
			}
			continue
		}
		for _, p := range []string{"Invalid parameter '", "is too long", "used inconsistently", "' missing", "Expected '='", "Help is not", "JSON", "Expecting"} {
			if strings.Contains(qemu, p) {
				t.Errorf("%q: qemu %q, ours ok", in, qemu)
				bad++
				break
			}
		}
		if bad > 30 {
			t.Fatal("too many")
		}
	}
}
