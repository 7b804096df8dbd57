package qmp

import (
	"bufio"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

// benchRequests is a stream of typical requests: graph changes with
// nested arguments, queries with ids, a secret with a long data string.
var benchRequests = []byte(strings.Repeat(`{"execute": "blockdev-add", "arguments": {"driver": "luks", "node-name": "l0", "key-secret": "sec0", "header": "hdr", "file": {"driver": "file", "filename": "/var/lib/images/disk-0.img", "aio": "threads", "cache": {"direct": true, "no-flush": false}}}, "id": 17}
{"execute":"query-named-block-nodes","arguments":{"flat":true},"id":"q-2"}
{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "sec1", "format": "base64", "data": "`+strings.Repeat("QUJDRA==", 512)+`"}, "id": ['n', 3, 1.5e3, null]}
`, 16))

// BenchmarkParser feeds requests as the monitor reads them (32 KiB reads).
func BenchmarkParser(b *testing.B) {
	n := 0
	p := NewParser(func(v any, err error) {
		if err != nil {
			b.Fatal(err)
		}
		n++
	})
	b.SetBytes(int64(len(benchRequests)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		for in := benchRequests; len(in) > 0; {
			k := min(len(in), 32<<10)
			p.Feed(in[:k])
			in = in[k:]
		}
	}
	if n != 48*b.N {
		b.Fatalf("%d messages", n)
	}
}

// BenchmarkRoundTrip is one request and its reply over a unix socket.
func BenchmarkRoundTrip(b *testing.B) {
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	s := NewServer(logrus.NewEntry(log), testVersion)
	type echoArgs struct {
		Name  string `json:"name"`
		Count int    `json:"count,omitempty"`
	}
	Handle(s, "x-echo", func(_ context.Context, _ *Monitor, a *echoArgs) (*echoArgs, error) {
		return a, nil
	})
	path := filepath.Join(b.TempDir(), "qmp.sock")
	l, err := ListenUnix(path)
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	conn, err := net.Dial("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	line := func() string {
		l, err := r.ReadString('\n')
		if err != nil {
			b.Fatal(err)
		}
		return l
	}
	line() // greeting
	conn.Write([]byte(`{"execute":"qmp_capabilities"}`))
	line()
	req := []byte(`{"execute": "x-echo", "arguments": {"name": "node-0", "count": 3}, "id": {"seq": 1, "tag": "bench"}}`)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := conn.Write(req); err != nil {
			b.Fatal(err)
		}
		if l := line(); !strings.HasPrefix(l, `{"return": {"name": "node-0", "count": 3}`) {
			b.Fatalf("reply %s", l)
		}
	}
}
