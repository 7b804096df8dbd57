package nbd

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"blockd/internal/qapi"
)

// Options is BlockdevOptionsNbd.
type Options struct {
	Server         SocketAddress `json:"server"`
	Export         *string       `json:"export,omitempty"`
	TLSCreds       *string       `json:"tls-creds,omitempty"`
	TLSHostname    *string       `json:"tls-hostname,omitempty"`
	XDirtyBitmap   *string       `json:"x-dirty-bitmap,omitempty"`
	ReconnectDelay *uint32       `json:"reconnect-delay,omitempty"`
	OpenTimeout    *uint32       `json:"open-timeout,omitempty"`
}

// SocketAddress is QAPI's flat SocketAddress union (inet and unix; vsock
// and fd are refused when the node opens).
type SocketAddress struct {
	Type qapi.SocketType
	Inet *qapi.InetSocketAddress
	Unix *qapi.UnixSocketAddress
	// given are the members as decoded, for the node's json: filename.
	given qapi.Object
}

// UnmarshalQAPI decodes the union with QEMU's error texts.
func (sa *SocketAddress) UnmarshalQAPI(d *qapi.Decoder, v any, path string) error {
	obj, ok := v.(map[string]any)
	if !ok {
		return &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: object", path)}
	}
	var base struct {
		Type qapi.SocketType `json:"type"`
	}
	tv, ok := obj["type"]
	if !ok {
		return &qapi.Error{Msg: fmt.Sprintf("Parameter '%s.type' is missing", path)}
	}
	if err := d.Decode(map[string]any{"type": tv}, path, &base); err != nil {
		return err
	}
	sa.Type = base.Type
	var variant any
	switch base.Type {
	case "inet":
		sa.Inet = &qapi.InetSocketAddress{}
		variant = sa.Inet
	case "unix":
		sa.Unix = &qapi.UnixSocketAddress{}
		variant = sa.Unix
	default:
		return fmt.Errorf("socket address type '%s' is not supported by blockd", base.Type)
	}
	if err := d.Decode(obj, path, &base, variant); err != nil {
		return err
	}
	sa.given = qapi.Object{{Name: "type", Value: string(sa.Type)}}
	if sa.Inet != nil {
		sa.given = append(sa.given, qapi.Member{Name: "host", Value: sa.Inet.Host}, qapi.Member{Name: "port", Value: sa.Inet.Port})
	} else {
		sa.given = append(sa.given, qapi.Member{Name: "path", Value: sa.Unix.Path})
	}
	return nil
}

// network returns the net.Dial network and address.
func (sa *SocketAddress) network() (string, string, error) {
	switch sa.Type {
	case "unix":
		if sa.Unix.Abstract != nil && *sa.Unix.Abstract {
			tight := sa.Unix.Tight == nil || *sa.Unix.Tight
			if !tight {
				return "", "", fmt.Errorf("abstract unix sockets with tight=off are not supported by blockd")
			}
			return "unix", "@" + sa.Unix.Path, nil
		}
		return "unix", sa.Unix.Path, nil
	case "inet":
		if sa.Inet.To != nil {
			return "", "", fmt.Errorf("port ranges ('to') are not supported when connecting")
		}
		nw := "tcp"
		v4 := sa.Inet.IPv4 != nil && *sa.Inet.IPv4
		v6 := sa.Inet.IPv6 != nil && *sa.Inet.IPv6
		switch {
		case v4 && !v6:
			nw = "tcp4"
		case v6 && !v4:
			nw = "tcp6"
		case sa.Inet.IPv4 != nil && !*sa.Inet.IPv4 && sa.Inet.IPv6 == nil:
			nw = "tcp6"
		case sa.Inet.IPv6 != nil && !*sa.Inet.IPv6 && sa.Inet.IPv4 == nil:
			nw = "tcp4"
		}
		host := strings.TrimSuffix(strings.TrimPrefix(sa.Inet.Host, "["), "]")
		return nw, net.JoinHostPort(host, sa.Inet.Port), nil
	}
	return "", "", fmt.Errorf("socket address type '%s' is not supported by blockd", sa.Type)
}

// filename is the node's name as QEMU's nbd_refresh_filename makes it, or
// "" when the address cannot be written as a URI (the node then gets a
// json: name).
func filename(sa *SocketAddress, export *string) string {
	var host, port, path string
	switch {
	case sa.Type == "inet" && sa.Inet.IPv4 == nil && sa.Inet.IPv6 == nil && sa.Inet.To == nil:
		host, port = sa.Inet.Host, sa.Inet.Port
	case sa.Type == "unix":
		path = sa.Unix.Path
	}
	var s string
	switch {
	case path != "" && export != nil:
		s = fmt.Sprintf("nbd+unix:///%s?socket=%s", *export, path)
	case path != "":
		s = "nbd+unix://?socket=" + path
	case host != "" && export != nil:
		s = fmt.Sprintf("nbd://%s:%s/%s", host, port, *export)
	case host != "":
		s = fmt.Sprintf("nbd://%s:%s", host, port)
	}
	// QEMU's exact_filename is a 4096-byte buffer.
	if len(s) >= 4096 {
		return ""
	}
	return s
}

// IsURI reports whether name is an NBD URI (nbd://, nbd+tcp://,
// nbd+unix://), which qemu-img opens with the nbd driver.
func IsURI(name string) bool {
	for _, p := range []string{"nbd://", "nbd+tcp://", "nbd+unix://"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// ParseURI turns an NBD URI into the nbd driver's options (leaves are
// strings, as QEMU's nbd_parse_uri puts them in the options dictionary):
// nbd[+tcp]://host[:port]/export or nbd+unix:///export?socket=path.
func ParseURI(name string) (map[string]any, error) {
	bad := fmt.Errorf("No valid URL specified")
	u, err := url.Parse(name)
	if err != nil {
		return nil, bad
	}
	var unix bool
	switch u.Scheme {
	case "nbd", "nbd+tcp":
	case "nbd+unix":
		unix = true
	default:
		return nil, bad
	}
	opts := map[string]any{"driver": "nbd"}
	if p := strings.TrimPrefix(u.Path, "/"); p != "" {
		opts["export"] = p
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil || len(q) > 1 || (unix && len(q) == 0) || (!unix && len(q) > 0) {
		return nil, bad
	}
	host, port := u.Hostname(), u.Port()
	if unix {
		sock := q.Get("socket")
		if host != "" || port != "" || sock == "" {
			return nil, bad
		}
		opts["server"] = map[string]any{"type": "unix", "path": sock}
		return opts, nil
	}
	if host == "" {
		return nil, bad
	}
	if port == "" {
		port = defaultPort
	} else if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
		return nil, bad
	} else {
		port = strconv.Itoa(p)
	}
	opts["server"] = map[string]any{"type": "inet", "host": host, "port": port}
	return opts, nil
}
