package luks

import (
	"context"
	"errors"
	"fmt"
	"io"

	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
)

// metaWriter returns a writer for the LUKS metadata and a release function.
// Without a detached header the file edge takes write and unshares
// consistent read and write for the update, as QEMU's crypto driver does
// while updating_keys is set. A detached header is shared read-only by its
// luks nodes, so keyslot updates attach to it with write permission for
// their duration.
func (n *node) metaWriter(ctx context.Context) (*graph.SectionIO, func(), error) {
	if n.header == nil {
		spec := n.fileSpec
		spec.ExtraPerm |= graph.PermWrite
		spec.Unshare |= graph.PermRead | graph.PermWrite
		if err := n.g.SetChildSpec(n.file, spec); err != nil {
			return nil, nil, err
		}
		return graph.NewSectionIO(ctx, n.file, 0, -1).WithFlags(graph.FUA), func() { _ = n.g.SetChildSpec(n.file, n.fileSpec) }, nil
	}
	hb := n.header.BDS()
	c, err := n.g.NewBackend(hb.Name(), fmt.Sprintf("node '%s' updating its LUKS header", n.name), graph.PermRead|graph.PermWrite|graph.PermResize, graph.PermRead|graph.PermWriteUnchanged)
	if err != nil {
		return nil, nil, err
	}
	return graph.NewSectionIO(ctx, c, 0, -1).WithFlags(graph.FUA), func() { n.g.ReleaseBackend(c) }, nil
}

func (n *node) secret(id string) ([]byte, error) {
	if n.g.Secrets == nil {
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	return n.g.Secrets.Get(id)
}

// Amend adds or erases keyslots with QEMU's x-blockdev-amend semantics.
func (n *node) Amend(ctx context.Context, v any, force bool) error {
	o := v.(*qcrypto.AmendOptions)
	n.amendMu.Lock()
	defer n.amendMu.Unlock()
	if n.readOnly {
		return errors.New("Block node is read-only")
	}
	k := &qcrypto.Keyslots{
		Header: n.hdr, KeySecret: n.keySecret, Secret: n.secret, Limits: n.kdfLimits,
		Writer: func(ctx context.Context) (io.WriterAt, func(), error) {
			w, release, err := n.metaWriter(ctx)
			return w, release, err
		},
	}
	return k.Amend(ctx, o, force)
}
