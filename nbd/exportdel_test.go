package nbd

import (
	"testing"
	"time"
)

// TestSafeRemoveAfterDisconnect: once a client has seen the server close
// its connection, the client is no longer attached, so a safe removal
// (block-export-del with mode safe) succeeds at once. Repeated with a
// graceful NBD_CMD_DISC (with and without requests in flight) and with a
// disconnect the server makes after a protocol error.
func TestSafeRemoveAfterDisconnect(t *testing.T) {
	e, m := memExport("d", mib)
	s, addr := startServer(t, Options{})
	data := pattern(64<<10, 3)
	for i := range 150 {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
		c := connect(t, addr, "d", features{structured: true})
		switch i % 3 {
		case 0: // graceful, nothing in flight
			if r := c.do(cmdWrite, 0, 0, uint64(len(data)), data); r.errno != 0 {
				t.Fatalf("write: errno %d", r.errno)
			}
			c.disc()
		case 1: // graceful with writes in flight: the server answers them first
			for j := range 4 {
				c.send(cmdWrite, 0, uint64(j)*64<<10, uint64(len(data)), data)
			}
			c.send(cmdDisc, 0, 0, 0, nil)
			c.expectEOF()
		case 2: // the server drops the client after a bad request magic
			c.send(cmdRead, 0, 0, 4096, nil)
			c.write(make([]byte, 28))
			c.expectEOF()
		}
		done, err := s.RemoveExport("d", false)
		if err != nil {
			t.Fatalf("iteration %d: safe remove right after the client saw its connection closed: %v", i, err)
		}
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("iteration %d: removal did not complete", i)
		}
		c.nc.Close()
	}
	if got := m.Bytes()[3*64<<10 : 4*64<<10]; string(got) != string(data) {
		t.Fatal("writes sent before NBD_CMD_DISC were not performed")
	}
}
