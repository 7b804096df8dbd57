package qmp

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

func flag(s string) *bool {
	switch s {
	case "on":
		b := true
		return &b
	case "off":
		b := false
		return &b
	}
	return nil
}

// TestInetFamily checks the matrix of QEMU's inet_ai_family_from_address
// and the IPV6_V6ONLY choice of its try_bind.
func TestInetFamily(t *testing.T) {
	for _, tc := range []struct {
		host, ipv4, ipv6 string
		fam              family
		v6only           bool
		err              string
	}{
		{"0.0.0.0", "", "", familyAny, false, ""},
		{"0.0.0.0", "", "off", familyIPv4, true, ""},
		{"0.0.0.0", "", "on", familyIPv6, true, ""},
		{"0.0.0.0", "off", "", familyIPv6, true, ""},
		{"0.0.0.0", "off", "off", 0, false, "Cannot disable IPv4 and IPv6 at same time"},
		{"0.0.0.0", "off", "on", familyIPv6, true, ""},
		{"0.0.0.0", "on", "", familyIPv4, true, ""},
		{"0.0.0.0", "on", "off", familyIPv4, true, ""},
		{"0.0.0.0", "on", "on", familyAny, false, ""},
		{"", "on", "on", familyIPv6, false, ""},
	} {
		a := InetAddr{Host: tc.host, IPv4: flag(tc.ipv4), IPv6: flag(tc.ipv6)}
		fam, err := a.family()
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%+v: error %v, want %q", tc, err, tc.err)
			}
			continue
		}
		if err != nil || fam != tc.fam || a.v6only() != tc.v6only {
			t.Errorf("%+v: family %v v6only %v (%v), want %v %v", tc, fam, a.v6only(), err, tc.fam, tc.v6only)
		}
	}
}

// TestInetAddrs checks what each host resolves to for each family, and
// the texts of the failures, which are QEMU's.
func TestInetAddrs(t *testing.T) {
	for _, tc := range []struct {
		a    InetAddr
		want string
	}{
		{InetAddr{Host: "0.0.0.0", Port: "1"}, "[0.0.0.0]"},
		{InetAddr{Host: "::", Port: "1"}, "[::]"},
		{InetAddr{Host: "", Port: "1"}, "[0.0.0.0 ::]"},
		{InetAddr{Host: "", Port: "1", IPv4: flag("off")}, "[::]"},
		{InetAddr{Host: "", Port: "1", IPv6: flag("off")}, "[0.0.0.0]"},
		{InetAddr{Host: "", Port: "1", IPv4: flag("on"), IPv6: flag("on")}, "[::]"},
		{InetAddr{Host: "::", Port: "1", IPv4: flag("on")},
			"address resolution failed for :::1: Address family for hostname not supported"},
		{InetAddr{Host: "0.0.0.0", Port: "1", IPv6: flag("on")},
			"address resolution failed for 0.0.0.0:1: Address family for hostname not supported"},
		{InetAddr{Host: "localhost", Port: "1", Numeric: true},
			"address resolution failed for localhost:1: Name or service not known"},
		{InetAddr{Host: "no-such-host.invalid", Port: "1"},
			"address resolution failed for no-such-host.invalid:1: Name or service not known"},
	} {
		fam, err := tc.a.family()
		if err != nil {
			t.Fatal(err)
		}
		ips, err := tc.a.addrs(fam)
		got := fmt.Sprint(ips)
		if err != nil {
			got = err.Error()
		}
		if got != tc.want {
			t.Errorf("%+v: %s, want %s", tc.a, got, tc.want)
		}
	}
}

func TestInetPort(t *testing.T) {
	for _, tc := range []struct {
		port    string
		numeric bool
		want    string
	}{
		{"", false, "0"},
		{"10809", false, "10809"},
		{"65535", false, "65535"},
		{"http", false, "80"},
		{"65536", false, "address resolution failed for h:65536: Servname not supported for ai_socktype"},
		{"-1", false, "address resolution failed for h:-1: Servname not supported for ai_socktype"},
		{"no-such-service", false, "address resolution failed for h:no-such-service: Servname not supported for ai_socktype"},
		{"http", true, "address resolution failed for h:http: Name or service not known"},
	} {
		p, err := InetAddr{Host: "h", Port: tc.port, Numeric: tc.numeric}.port()
		got := strconv.Itoa(p)
		if err != nil {
			got = err.Error()
		}
		if got != tc.want {
			t.Errorf("port %q numeric %v: %s, want %s", tc.port, tc.numeric, got, tc.want)
		}
	}
}

// needIPv6 skips the test when the machine has no IPv6 loopback.
func needIPv6(t *testing.T) {
	t.Helper()
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6: %v", err)
	}
	l.Close()
}

// reaches reports whether a TCP connection to ip:port succeeds.
func reaches(ip string, port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(port)), 2*time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func listenPort(t *testing.T, l net.Listener) int {
	t.Helper()
	ap, err := netip.ParseAddrPort(l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return int(ap.Port())
}

// TestListenInetFamilies listens as QEMU does for each kind of host and
// checks which loopback addresses reach the socket: 0.0.0.0 is IPv4 only
// (Go's "tcp" would make it dual-stack), :: takes both unless ipv4=off.
func TestListenInetFamilies(t *testing.T) {
	needIPv6(t)
	for _, tc := range []struct {
		a        InetAddr
		v4, v6   bool
		nSockets int
	}{
		{InetAddr{Host: "0.0.0.0"}, true, false, 1},
		{InetAddr{Host: "127.0.0.1"}, true, false, 1},
		{InetAddr{Host: "::"}, true, true, 1},
		{InetAddr{Host: "::", IPv4: flag("off")}, false, true, 1},
		{InetAddr{Host: "::", IPv6: flag("on")}, false, true, 1},
		{InetAddr{Host: "::", IPv4: flag("on"), IPv6: flag("on")}, true, true, 1},
		{InetAddr{Host: "::1"}, false, true, 1},
		{InetAddr{Host: "", IPv4: flag("on"), IPv6: flag("on")}, true, true, 1},
	} {
		l, err := ListenInet(tc.a)
		if err != nil {
			t.Errorf("%+v: %v", tc.a, err)
			continue
		}
		n := 1
		if m, ok := l.(*multiListener); ok {
			n = len(m.ls)
		}
		port := listenPort(t, l)
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		if got := reaches("127.0.0.1", port); got != tc.v4 || n != tc.nSockets {
			t.Errorf("%+v: %d sockets, IPv4 reaches it: %v; want %d, %v", tc.a, n, got, tc.nSockets, tc.v4)
		}
		if got := reaches("::1", port); got != tc.v6 {
			t.Errorf("%+v: IPv6 reaches it: %v, want %v", tc.a, got, tc.v6)
		}
		l.Close()
	}
}

// TestListenInetBothFamilies: an empty host listens on 0.0.0.0 and on an
// IPv6-only ::, on the same port when one is given, and the one listener
// returned accepts on both.
func TestListenInetBothFamilies(t *testing.T) {
	needIPv6(t)
	probe, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := listenPort(t, probe)
	probe.Close()
	l, err := ListenInet(InetAddr{Host: "", Port: strconv.Itoa(port)})
	if err != nil {
		t.Skipf("port %d taken again: %v", port, err)
	}
	defer l.Close()
	accepted := make(chan string, 2)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c.LocalAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	for _, ip := range []string{"127.0.0.1", "::1"} {
		if !reaches(ip, port) {
			t.Fatalf("%s does not reach the listener", ip)
		}
		select {
		case got := <-accepted:
			if got != ip {
				t.Errorf("connection to %s accepted on %s", ip, got)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("connection to %s not accepted", ip)
		}
	}
	l.Close()
	if _, err := l.Accept(); err == nil {
		t.Fatal("Accept after Close succeeded")
	}
}

// TestListenInetPortRange: with "to" the first free port of the range is
// taken; a busy port is QEMU's "Failed to find an available port".
func TestListenInetPortRange(t *testing.T) {
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := listenPort(t, busy)
	_, err = ListenInet(InetAddr{Host: "127.0.0.1", Port: strconv.Itoa(port)})
	if want := "Failed to find an available port: Address already in use"; err == nil || err.Error() != want {
		t.Errorf("busy port: %v, want %q", err, want)
	}
	if port < 65535 {
		to := uint16(port + 1)
		l, err := ListenInet(InetAddr{Host: "127.0.0.1", Port: strconv.Itoa(port), To: &to})
		if err == nil {
			if got := listenPort(t, l); got != port+1 {
				t.Errorf("range %d-%d: listening on %d", port, to, got)
			}
			l.Close()
		} else if err.Error() != "Failed to find an available port: Address already in use" {
			t.Error(err)
		}
	}
	to := uint16(port - 1)
	_, err = ListenInet(InetAddr{Host: "127.0.0.1", Port: strconv.Itoa(port), To: &to})
	if want := "Failed to create a socket"; err == nil || err.Error() != want {
		t.Errorf("empty range: %v, want %q", err, want)
	}
}
