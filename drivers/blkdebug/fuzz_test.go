package blkdebug_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"testing"
	"time"

	"blockd/graph"
)

// FuzzBlkdebug opens filters from arbitrary option trees and runs
// arbitrary requests through them: no panic and no hang (delays end with
// the request's context).
func FuzzBlkdebug(f *testing.F) {
	for _, s := range []string{
		`[{}]`,
		`[{"event":"none","sector":8,"errno":28}]`,
		`[{"iotype":["read","block-status"],"once":true},{"iotype":"write","after":3,"errno":5}]`,
		`[{"event":"read_aio","state":2,"iotype":"read"}],"set-state":[{"event":"write_aio","new_state":2}]`,
		`[{"iotype":"flush","delay-ns":1000,"errno":0}],"align":4096,"max-transfer":65536`,
		`[{"event":"pwritev_done","sector":-1,"immediately":true}]`,
	} {
		f.Add(s, []byte{0, 0, 1, 0, 1, 2, 8, 0, 3, 0, 0, 0, 4, 7, 255, 1, 5, 1, 1, 1})
	}
	f.Fuzz(func(t *testing.T, rules string, ops []byte) {
		js := `{"driver":"blkdebug","node-name":"dbg","discard":"unmap","image":{"driver":"mem","size":65536,"discard":"unmap"},"inject-error":` + rules + `}`
		d := json.NewDecoder(bytes.NewReader([]byte(js)))
		d.UseNumber()
		var tree map[string]any
		if d.Decode(&tree) != nil {
			return
		}
		g := newGraph()
		defer g.Close()
		b, err := g.Add(context.Background(), tree, false)
		if err != nil {
			return
		}
		c, err := g.NewBackend(b.Name(), "fuzz", graph.PermRead|graph.PermWrite, graph.PermAll)
		if err != nil {
			t.Fatal(err)
		}
		defer g.ReleaseBackend(c)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		buf := make([]byte, 255*64)
		for len(ops) >= 4 {
			op, off, n := ops[0]%6, int64(binary.BigEndian.Uint16(ops[1:]))%65536, int64(ops[3])*64
			ops = ops[4:]
			if off+n > 65536 {
				n = 65536 - off
			}
			switch op {
			case 0:
				_ = c.ReadAt(ctx, buf[:n], off)
			case 1:
				_ = c.WriteAt(ctx, buf[:n], off, graph.FUA)
			case 2:
				_ = c.WriteZeroes(ctx, off, n, graph.MayUnmap)
			case 3:
				_ = c.Discard(ctx, off, n)
			case 4:
				_ = c.Flush(ctx)
			case 5:
				_, _ = c.BlockStatus(ctx, off, n)
			}
		}
	})
}
