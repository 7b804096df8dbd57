package daemon

import (
	"crypto/tls"
	"errors"
	"fmt"

	"blockd/internal/tlscreds"
)

// tlsObject is a loaded tls-creds-x509 object.
type tlsObject struct {
	endpoint string
	config   *tls.Config
}

type tlsX509Props struct {
	Dir         *string `json:"dir,omitempty"`
	Endpoint    *string `json:"endpoint,omitempty"`
	VerifyPeer  *bool   `json:"verify-peer,omitempty"`
	Priority    *string `json:"priority,omitempty"`
	SanityCheck *bool   `json:"sanity-check,omitempty"`
	PasswordID  *string `json:"passwordid,omitempty"`
	Loaded      *bool   `json:"loaded,omitempty"`
}

func (d *Daemon) addTLSX509(id string, p tlsX509Props) (*tlsObject, error) {
	if p.Loaded != nil {
		return nil, errors.New("Property 'tls-creds-x509.loaded' is not writable")
	}
	if p.PasswordID != nil {
		return nil, errors.New("encrypted TLS keys (passwordid) are not supported by blockd")
	}
	o := tlscreds.X509Options{VerifyPeer: true, Endpoint: "client"}
	if p.Dir != nil {
		o.Dir = *p.Dir
	}
	if p.Endpoint != nil {
		if *p.Endpoint != "client" && *p.Endpoint != "server" {
			return nil, fmt.Errorf("Parameter 'endpoint' does not accept value '%s'", *p.Endpoint)
		}
		o.Endpoint = *p.Endpoint
	}
	if p.VerifyPeer != nil {
		o.VerifyPeer = *p.VerifyPeer
	}
	if p.Priority != nil {
		o.Priority = *p.Priority
	}
	if p.SanityCheck != nil {
		o.SkipSanityCheck = !*p.SanityCheck
	}
	cfg, err := tlscreds.LoadX509(o)
	if err != nil {
		return nil, err
	}
	return &tlsObject{endpoint: o.Endpoint, config: cfg}, nil
}

// tlsStore gives drivers the tls-creds objects (graph.TLSCredStore: the
// nbd driver's tls-creds), with QEMU's nbd_get_tls_creds errors.
type tlsStore struct{ d *Daemon }

func (s tlsStore) ClientTLS(id string) (*tls.Config, error) {
	s.d.mu.Lock()
	o, ok := s.d.tls[id]
	_, other := s.d.objects[id]
	s.d.mu.Unlock()
	switch {
	case !ok && other:
		return nil, fmt.Errorf("Object with id '%s' is not TLS credentials", id)
	case !ok:
		return nil, fmt.Errorf("No TLS credentials with id '%s'", id)
	case o.endpoint != "client":
		return nil, errors.New("Expecting TLS credentials with a client endpoint")
	}
	return o.config, nil
}
