package main

import (
	"net"

	"blockd/internal/qapi"
	"blockd/qmp"
)

// chardevInet listens on the inet address of a --chardev socket: host and
// port, and QemuOpts' to, ipv4 and ipv6 as QEMU's qemu_chr_parse_socket
// reads them.
func chardevInet(kv map[string]string) (net.Listener, error) {
	opts := map[string]any{}
	for _, k := range []string{"to", "ipv4", "ipv6"} {
		if v, ok := kv[k]; ok {
			opts[k] = v
		}
	}
	var f struct {
		To   *uint16 `json:"to,omitempty"`
		IPv4 *bool   `json:"ipv4,omitempty"`
		IPv6 *bool   `json:"ipv6,omitempty"`
	}
	if err := qapi.Decode(opts, true, &f); err != nil {
		return nil, err
	}
	return qmp.ListenInet(qmp.InetAddr{Host: kv["host"], Port: kv["port"], To: f.To, IPv4: f.IPv4, IPv6: f.IPv6})
}
