package daemon

import (
	"errors"
	"fmt"
	"net"

	"blockd/internal/qapi"
	"blockd/qmp"
)

// socketAddress is a decoded SocketAddress (flat) or SocketAddressLegacy
// (nested under "data").
type socketAddress struct {
	Type qapi.SocketType
	Inet *qapi.InetSocketAddress
	Unix *qapi.UnixSocketAddress
}

// decodeSocketAddress decodes addr at path, nested (QMP) or flat (command
// line), with QEMU's error texts.
func decodeSocketAddress(d *qapi.Decoder, v any, path string, nested bool) (*socketAddress, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: object", path)}
	}
	var base struct {
		Type qapi.SocketType `json:"type"`
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
		sa.Inet = &qapi.InetSocketAddress{}
		variant = sa.Inet
	case "unix":
		sa.Unix = &qapi.UnixSocketAddress{}
		variant = sa.Unix
	default:
		return nil, fmt.Errorf("socket address type '%s' is not supported by blockd", base.Type)
	}
	if nested {
		var wrap struct {
			Type qapi.SocketType `json:"type"`
			Data map[string]any  `json:"data"`
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
