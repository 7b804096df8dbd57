package daemon

import (
	"errors"
	"fmt"
	"net"

	"blockd/internal/qapi"
	"blockd/qmp"
)

// InetSocketAddress is QAPI's InetSocketAddress.
type InetSocketAddress struct {
	Host      string  `json:"host"`
	Port      string  `json:"port"`
	Numeric   *bool   `json:"numeric,omitempty"`
	To        *uint16 `json:"to,omitempty"`
	IPv4      *bool   `json:"ipv4,omitempty"`
	IPv6      *bool   `json:"ipv6,omitempty"`
	KeepAlive *bool   `json:"keep-alive,omitempty"`
}

// UnixSocketAddress is QAPI's UnixSocketAddress.
type UnixSocketAddress struct {
	Path     string `json:"path"`
	Abstract *bool  `json:"abstract,omitempty"`
	Tight    *bool  `json:"tight,omitempty"`
}

type socketType string

func (socketType) EnumValues() []string { return []string{"inet", "unix", "vsock", "fd"} }

// socketAddress is a decoded SocketAddress (flat) or SocketAddressLegacy
// (nested under "data").
type socketAddress struct {
	Type socketType
	Inet *InetSocketAddress
	Unix *UnixSocketAddress
}

// decodeSocketAddress decodes addr at path, nested (QMP) or flat (command
// line), with QEMU's error texts.
func decodeSocketAddress(d *qapi.Decoder, v any, path string, nested bool) (*socketAddress, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: object", path)}
	}
	var base struct {
		Type socketType `json:"type"`
	}
	if err := d.Decode(map[string]any{"type": obj["type"]}, path, &base); err != nil {
		if _, ok := obj["type"]; !ok {
			return nil, &qapi.Error{Msg: fmt.Sprintf("Parameter '%s.type' is missing", path)}
		}
		return nil, err
	}
	sa := &socketAddress{Type: base.Type}
	var variant any
	switch base.Type {
	case "inet":
		sa.Inet = &InetSocketAddress{}
		variant = sa.Inet
	case "unix":
		sa.Unix = &UnixSocketAddress{}
		variant = sa.Unix
	default:
		return nil, fmt.Errorf("socket address type '%s' is not supported by blockd", base.Type)
	}
	if nested {
		var wrap struct {
			Type socketType     `json:"type"`
			Data map[string]any `json:"data"`
		}
		if err := d.Decode(obj, path, &wrap); err != nil {
			return nil, err
		}
		if err := d.Decode(wrap.Data, path+".data", variant); err != nil {
			return nil, err
		}
		return sa, nil
	}
	if err := d.Decode(obj, path, &base, variant); err != nil {
		return nil, err
	}
	return sa, nil
}

func (sa *socketAddress) listen() (net.Listener, error) {
	switch sa.Type {
	case "unix":
		if sa.Unix.Abstract != nil && *sa.Unix.Abstract {
			return nil, errors.New("abstract unix sockets are not supported")
		}
		l, err := qmp.ListenUnix(sa.Unix.Path)
		if err != nil {
			return nil, fmt.Errorf("Failed to bind socket to %s: %v", sa.Unix.Path, errors.Unwrap(err))
		}
		return l, nil
	case "inet":
		in := sa.Inet
		return qmp.ListenInet(qmp.InetAddr{Host: in.Host, Port: in.Port, Numeric: in.Numeric != nil && *in.Numeric,
			To: in.To, IPv4: in.IPv4, IPv6: in.IPv6})
	}
	return nil, fmt.Errorf("socket address type '%s' is not supported by blockd", sa.Type)
}
