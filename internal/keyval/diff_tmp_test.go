package keyval

import (
	"math/rand"
	"strings"
	"sync"
	"testing"
)

func TestTmpDiff(t *testing.T) {
	path := qsd(t)
	r := rand.New(rand.NewSource(7))
	alphaKV := []string{"a", "b", ".", "0", "1", "=", ",", ",,", "?", "help", "_", "-", "x=", "01", "__a_", "{", " ", "__a.b-", "00", "99999999999"}
	alphaJS := []string{"{", "}", "[", "]", ":", ",", "\"a\"", "'b'", "\"", "'", "1", "-", "0", ".", "e", "true", "nul", " ", "\\u00e9", "\\", "\\ud800", "\\udc00", "\xc3\xa9", "\xc3", "\xff", "\t", "x", "\"a\":", "{\"a\":", "1.5", "%"}
	type c struct{ in, ours string; ok bool }
	var cases []c
	for n := 0; n < 3000; n++ {
		var b strings.Builder
		alpha := alphaKV
		if n%2 == 1 {
			alpha = alphaJS
			b.WriteString("{")
		}
		k := 1 + r.Intn(10)
		for i := 0; i < k; i++ {
			b.WriteString(alpha[r.Intn(len(alpha))])
		}
		in := b.String()
		_, err := Parse(in, "driver")
		cc := c{in: in, ok: err == nil}
		if err != nil {
			cc.ours = err.Error()
		}
		cases = append(cases, cc)
	}
	var mu sync.Mutex
	bad := 0
	var wg sync.WaitGroup
	ch := make(chan c)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for cc := range ch {
				out := runQSD(t, path, "--blockdev", cc.in)
				msg := strings.TrimSuffix(strings.TrimPrefix(out, "qemu-storage-daemon: --blockdev="+cc.in+": "), "\n")
				mu.Lock()
				if !cc.ok && msg != cc.ours {
					t.Errorf("%q: qemu %q, ours %q", cc.in, msg, cc.ours)
					bad++
				}
				if cc.ok {
					for _, p := range keyvalErrorTexts {
						if strings.Contains(msg, p) {
							t.Errorf("%q: qemu %q, ours ok", cc.in, msg)
							bad++
							break
						}
					}
				}
				mu.Unlock()
			}
		}()
	}
	for _, cc := range cases {
		ch <- cc
	}
	close(ch)
	wg.Wait()
}
