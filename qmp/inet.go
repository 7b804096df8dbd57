package qmp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// InetAddr is QAPI's InetSocketAddress as far as a listening socket uses
// it.
type InetAddr struct {
	Host string
	Port string
	// Numeric: Host and Port must be numeric; no name is looked up.
	Numeric bool
	// To, when set, makes Port the first of a range of ports ending at
	// *To; the first one free is used.
	To *uint16
	// IPv4 and IPv6 allow (true) or refuse (false) a family; nil is QAPI's
	// "not given".
	IPv4, IPv6 *bool
}

// The address families asked for, after inet_ai_family_from_address.
type family int

const (
	familyAny family = iota
	familyIPv4
	familyIPv6
)

// family is QEMU's inet_ai_family_from_address: which families the host
// may resolve to, given the ipv4 and ipv6 flags.
func (a InetAddr) family() (family, error) {
	v4, v6 := a.IPv4 != nil && *a.IPv4, a.IPv6 != nil && *a.IPv6
	v4off, v6off := a.IPv4 != nil && !*a.IPv4, a.IPv6 != nil && !*a.IPv6
	switch {
	case v4off && v6off:
		return 0, errors.New("Cannot disable IPv4 and IPv6 at same time")
	case v4 && v6:
		// An empty host then means one dual-stack socket on "::".
		if a.Host == "" {
			return familyIPv6, nil
		}
		return familyAny, nil
	case v6 || v4off:
		return familyIPv6, nil
	case v4 || v6off:
		return familyIPv4, nil
	}
	return familyAny, nil
}

// v6only is the IPV6_V6ONLY setting of QEMU's try_bind: an IPv6 socket
// also takes IPv4 connections only when neither flag is given or both are
// true.
func (a InetAddr) v6only() bool {
	both := a.IPv4 != nil && *a.IPv4 && a.IPv6 != nil && *a.IPv6
	return !(a.IPv4 == nil && a.IPv6 == nil || both)
}

// resolveErr is QEMU's text for a failed getaddrinfo.
func (a InetAddr) resolveErr(gai string) error {
	return fmt.Errorf("address resolution failed for %s:%s: %s", a.Host, a.Port, gai)
}

// port is the port getaddrinfo makes of a.Port: empty is 0 (the kernel
// picks one), a number is itself, otherwise a TCP service name. Numbers
// above 65535 are refused (glibc would truncate them to 16 bits).
func (a InetAddr) port() (int, error) {
	if a.Port == "" {
		return 0, nil
	}
	if n, err := strconv.ParseUint(a.Port, 10, 64); err == nil {
		if n > 65535 {
			return 0, a.resolveErr("Servname not supported for ai_socktype")
		}
		return int(n), nil
	}
	if a.Numeric {
		return 0, a.resolveErr("Name or service not known")
	}
	p, err := net.LookupPort("tcp", a.Port)
	if err != nil || a.Port[0] == '-' || a.Port[0] == '+' {
		return 0, a.resolveErr("Servname not supported for ai_socktype")
	}
	return p, nil
}

// addrs is getaddrinfo with AI_PASSIVE for the host and family: the
// wildcard addresses for an empty host, the address itself for a numeric
// host of the right family, otherwise the host name's addresses.
func (a InetAddr) addrs(fam family) ([]netip.Addr, error) {
	if a.Host == "" {
		switch fam {
		case familyIPv4:
			return []netip.Addr{netip.IPv4Unspecified()}, nil
		case familyIPv6:
			return []netip.Addr{netip.IPv6Unspecified()}, nil
		}
		return []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()}, nil
	}
	if ip, err := netip.ParseAddr(a.Host); err == nil {
		if fam == familyIPv4 && !ip.Is4() || fam == familyIPv6 && ip.Is4() {
			return nil, a.resolveErr("Address family for hostname not supported")
		}
		return []netip.Addr{ip}, nil
	}
	if a.Numeric {
		return nil, a.resolveErr("Name or service not known")
	}
	network := map[family]string{familyAny: "ip", familyIPv4: "ip4", familyIPv6: "ip6"}[fam]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, network, a.Host)
	if err != nil || len(ips) == 0 {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsTemporary {
			return nil, a.resolveErr("Temporary failure in name resolution")
		}
		return nil, a.resolveErr("Name or service not known")
	}
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, ip := range ips {
		ip = ip.Unmap()
		if !seen[ip] {
			seen[ip] = true
			out = append(out, ip)
		}
	}
	return out, nil
}

// ListenInet listens as QEMU 7.2's qio_net_listener_open_sync does: the
// host is resolved for the families the ipv4 and ipv6 flags allow, and
// one socket listens on each address found, so "0.0.0.0" listens on IPv4
// only, "::" on IPv6 (taking IPv4 too unless a flag says otherwise) and an
// empty host on both. An address that cannot be listened on is skipped;
// when none can, the first error is returned. Several sockets are returned
// as one net.Listener that accepts on all of them.
func ListenInet(a InetAddr) (net.Listener, error) {
	fam, err := a.family()
	if err != nil {
		return nil, err
	}
	port, err := a.port()
	if err != nil {
		return nil, err
	}
	ips, err := a.addrs(fam)
	if err != nil {
		return nil, err
	}
	var ls []net.Listener
	var first error
	for _, ip := range ips {
		l, err := a.listenAddr(ip, port)
		if err != nil {
			if first == nil {
				first = err
			}
			continue
		}
		ls = append(ls, l)
	}
	switch len(ls) {
	case 0:
		return nil, first
	case 1:
		return ls[0], nil
	}
	return newMultiListener(ls), nil
}

// listenAddr is QEMU's inet_listen_saddr for one resolved address: the
// first port of the range that is free.
func (a InetAddr) listenAddr(ip netip.Addr, port int) (net.Listener, error) {
	last := port
	if a.To != nil {
		last = int(*a.To)
	}
	created := false
	for p := port; p <= last; p++ {
		l, err := listenOne(ip, p, a.v6only())
		if err == nil {
			return l, nil
		}
		var se *os.SyscallError
		isSocket := errors.As(err, &se) && se.Syscall == "socket"
		switch {
		case isSocket && !created:
			// No socket of this family (IPv6 turned off): the next
			// address may do better.
			return nil, fmt.Errorf("Failed to create a socket: %s", errnoText(err))
		case isSocket:
			return nil, fmt.Errorf("Failed to recreate failed listening socket: %s", errnoText(err))
		}
		created = true
		if !errors.Is(err, syscall.EADDRINUSE) {
			if se != nil && se.Syscall == "listen" {
				return nil, fmt.Errorf("Failed to listen on socket: %s", errnoText(err))
			}
			return nil, fmt.Errorf("Failed to bind socket: %s", errnoText(err))
		}
	}
	if !created {
		return nil, errors.New("Failed to create a socket")
	}
	return nil, fmt.Errorf("Failed to find an available port: %s", errnoText(syscall.EADDRINUSE))
}

// listenOne listens on ip:port with a socket of ip's family alone (Go's
// "tcp" would make a dual-stack socket even for 0.0.0.0). An IPv6 socket
// that is to take IPv4 too and finds the IPv4 port taken is made IPv6-only
// and bound again, as QEMU's try_bind does.
func listenOne(ip netip.Addr, port int, v6only bool) (net.Listener, error) {
	addr := netip.AddrPortFrom(ip, uint16(port)).String()
	if ip.Is4() {
		return net.Listen("tcp4", addr)
	}
	listen := func(only bool) (net.Listener, error) {
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY, boolInt(only))
			})
			if err != nil {
				return err
			}
			return os.NewSyscallError("setsockopt", serr)
		}}
		return lc.Listen(context.Background(), "tcp6", addr)
	}
	l, err := listen(v6only)
	if err != nil && !v6only && errors.Is(err, syscall.EADDRINUSE) {
		l, err = listen(true)
	}
	return l, err
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// errnoText is the C library's text for the errno in err ("Address
// already in use"); Go's texts are glibc's in lower case.
func errnoText(err error) string {
	var errno syscall.Errno
	msg := err.Error()
	if errors.As(err, &errno) {
		msg = errno.Error()
	}
	if msg == "" {
		return msg
	}
	return strings.ToUpper(msg[:1]) + msg[1:]
}

// multiListener accepts on several listeners. One goroutine per listener
// accepts and hands each connection (or error) over; it waits for Accept
// to take it, so at most one connection per listener is held outside the
// kernel's queue.
type multiListener struct {
	ls    []net.Listener
	conns chan accepted
	// done is closed by Close; the goroutines then close what they hold.
	done chan struct{}
	once sync.Once
}

type accepted struct {
	c   net.Conn
	err error
}

func newMultiListener(ls []net.Listener) *multiListener {
	m := &multiListener{ls: ls, conns: make(chan accepted), done: make(chan struct{})}
	for _, l := range ls {
		go m.accept(l)
	}
	return m
}

func (m *multiListener) accept(l net.Listener) {
	for {
		c, err := l.Accept()
		select {
		case m.conns <- accepted{c, err}:
		case <-m.done:
			if c != nil {
				c.Close()
			}
			return
		}
		if errors.Is(err, net.ErrClosed) {
			return
		}
	}
}

// Accept returns the next connection from any of the listeners.
func (m *multiListener) Accept() (net.Conn, error) {
	select {
	case a := <-m.conns:
		return a.c, a.err
	case <-m.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: m.Addr(), Err: net.ErrClosed}
	}
}

// Close closes every listener.
func (m *multiListener) Close() error {
	var first error
	m.once.Do(func() {
		close(m.done)
		for _, l := range m.ls {
			if err := l.Close(); err != nil && first == nil {
				first = err
			}
		}
	})
	return first
}

// Addr is the first listener's address.
func (m *multiListener) Addr() net.Addr { return m.ls[0].Addr() }
