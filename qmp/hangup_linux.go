package qmp

import (
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// hangupPoll is how often watchHangup looks at the socket.
const hangupPoll = 20 * time.Millisecond

// watchHangup calls gone once the peer of conn has closed the connection in
// both directions, and returns a function that stops watching. Reading EOF
// is not enough: a client that half-closes after sending still waits for
// its replies. On a unix socket the kernel reports a full close as POLLHUP;
// a TCP peer's close looks like a half-close, so TCP is not watched.
func watchHangup(conn net.Conn, gone func()) (stop func()) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return func() {}
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(hangupPoll)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			hup := false
			cerr := rc.Control(func(fd uintptr) {
				p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
				if n, err := unix.Poll(p, 0); err == nil && n == 1 {
					hup = p[0].Revents&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
				}
			})
			if cerr != nil { // closed on this side
				return
			}
			if hup {
				gone()
				return
			}
		}
	}()
	return func() { close(done) }
}
