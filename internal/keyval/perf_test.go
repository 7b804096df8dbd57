package keyval

import (
	"strings"
	"testing"
	"time"
)

// TestLargeInputs checks that inputs of the size a command line can carry
// (Linux limits one argument to 128 KiB) parse quickly.
func TestLargeInputs(t *testing.T) {
	deepKey := "a" + strings.Repeat(".b", 64<<10) + "=x"
	deepList := "a" + strings.Repeat(".0", 64<<10) + "=x"
	var many strings.Builder
	for i := 0; i < 20000; i++ {
		if i > 0 {
			many.WriteByte(',')
		}
		many.WriteString("l.")
		many.WriteString(strings.Repeat("1", 1+i%5))
		many.WriteString("=v")
	}
	commas := "a=" + strings.Repeat(",,", 64<<10)
	for _, in := range []string{deepKey, deepList, many.String(), commas} {
		start := time.Now()
		_, _ = Parse(in, "")
		_, _ = ParseQemuOptsList(in, "x")
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("input of %d bytes took %v", len(in), d)
		}
	}
}
