package qcrypto_test

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
	"blockd/internal/qapi"
)

// GraphError lets the edges classify luksfmt errors with graph's sentinels
// while the message and the luksfmt sentinel still match.
func TestGraphError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want error // the graph sentinel, nil for none
	}{
		{luksfmt.ErrNotLUKS, graph.ErrCorrupt},
		{fmt.Errorf("%w: device is too small", luksfmt.ErrNotLUKS), graph.ErrCorrupt},
		{fmt.Errorf("%w: keyslot 3: bad area", luksfmt.ErrCorrupt), graph.ErrCorrupt},
		{fmt.Errorf("%w: luks version 3", luksfmt.ErrUnsupported), graph.ErrNotSupported},
		{fmt.Errorf("keyslot 0: %w", luksfmt.ErrKDFLimit), graph.ErrNotSupported},
		{fmt.Errorf("%w: json area full", luksfmt.ErrNoSpace), graph.ErrNoSpace},
		{luksfmt.ErrWrongPassphrase, nil},
		{io.ErrUnexpectedEOF, nil},
	} {
		got := qcrypto.GraphError(tc.err)
		if got.Error() != tc.err.Error() {
			t.Errorf("GraphError(%q) says %q", tc.err, got)
		}
		if !errors.Is(got, tc.err) {
			t.Errorf("GraphError(%q) no longer matches what it wraps", tc.err)
		}
		for _, s := range []error{graph.ErrCorrupt, graph.ErrNotSupported, graph.ErrNoSpace} {
			if errors.Is(got, s) != (s == tc.want) {
				t.Errorf("errors.Is(GraphError(%q), %q) = %v", tc.err, s, !(s == tc.want))
			}
		}
		if tc.want == nil && got != tc.err {
			t.Errorf("GraphError(%q) changed an error of no luksfmt kind", tc.err)
		}
	}
	if qcrypto.GraphError(nil) != nil {
		t.Error("GraphError(nil) != nil")
	}
	// An error that already matches its graph sentinel is returned as is.
	both := fmt.Errorf("%w: %w", luksfmt.ErrCorrupt, graph.ErrCorrupt)
	if qcrypto.GraphError(both) != both {
		t.Error("GraphError wrapped an error that already matched graph.ErrCorrupt")
	}
}

// The QAPI shapes are byte for byte what QEMU prints: members where QEMU's
// QDict puts them, detached-header only in the luks node's shapes,
// iterations and stripes only for active keyslots.
func TestInfoShapes(t *testing.T) {
	v1 := luksfmt.Info{CipherAlg: "aes-256", CipherMode: "xts", IVGenAlg: "plain64", HashAlg: "sha256",
		PayloadOffset: 2068480, MasterKeyIters: 1000, UUID: "u", Version: 1, SectorSize: 512,
		Slots: []luksfmt.SlotInfo{{Active: true, Iters: 5, Stripes: 4000, KeyOffset: 4096, KDF: "pbkdf2"}, {Iters: 9, Stripes: 9, KeyOffset: 8192}}}
	v2 := luksfmt.Info{CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "essiv", IVGenHashAlg: "sha256", HashAlg: "sha1",
		MasterKeyIters: 1000, UUID: "u", Version: 2, SectorSize: 4096, Label: "l",
		Slots: []luksfmt.SlotInfo{{Active: true, Iters: 4, Stripes: 4000, KeyOffset: 32768, KDF: "argon2id", MemoryKiB: 32, Parallel: 1, Priority: "normal", KeySize: 32, AreaSize: 258048}}}
	for _, tc := range []struct {
		name string
		v    any
		want string
	}{
		{"qcow2", qcrypto.NewInfo(v1), `{"ivgen-alg": "plain64", "hash-alg": "sha256", "cipher-alg": "aes-256", "uuid": "u", "cipher-mode": "xts", "slots": [{"active": true, "iters": 5, "key-offset": 4096, "stripes": 4000}, {"active": false, "key-offset": 8192}], "payload-offset": 2068480, "master-key-iters": 1000}`},
		{"luks1 node", qcrypto.NodeInfo(v1), `{"ivgen-alg": "plain64", "detached-header": false, "hash-alg": "sha256", "cipher-alg": "aes-256", "uuid": "u", "cipher-mode": "xts", "slots": [{"active": true, "iters": 5, "key-offset": 4096, "stripes": 4000}, {"active": false, "key-offset": 8192}], "payload-offset": 2068480, "master-key-iters": 1000}`},
		{"luks2 node", qcrypto.NodeInfo(v2), `{"ivgen-alg": "essiv", "detached-header": true, "hash-alg": "sha1", "cipher-alg": "aes-128", "uuid": "u", "sector-size": 4096, "version": 2, "ivgen-hash-alg": "sha256", "label": "l", "cipher-mode": "cbc", "slots": [{"active": true, "key-size": 32, "iters": 4, "threads": 1, "keyslot": 0, "memory": 32, "kdf": "argon2id", "key-offset": 32768, "stripes": 4000, "area-size": 258048, "priority": "normal"}], "payload-offset": 0, "master-key-iters": 1000}`},
	} {
		if got := string(qapi.Marshal(tc.v)); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}
