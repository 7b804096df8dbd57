package qapi

// The members of QAPI's SocketAddress union that blockd takes (the daemon
// listens on them, the nbd driver connects to them).

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

// SocketType is QAPI's SocketAddressType.
type SocketType string

// EnumValues implements the decoder's enum check.
func (SocketType) EnumValues() []string { return []string{"inet", "unix", "vsock", "fd"} }
