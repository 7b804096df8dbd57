package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"

	"blockd/graph"
	"blockd/internal/qapi"
	"blockd/nbd"
	"blockd/qmp"
)

type nbdServerArgs struct {
	TLSCreds       *string     `json:"tls-creds,omitempty"`
	TLSAuthz       *string     `json:"tls-authz,omitempty"`
	MaxConnections *uint32     `json:"max-connections,omitempty"`
	Addr           qapi.Opaque `json:"addr"`
}

// nbdState is the running NBD server and its exports.
type nbdState struct {
	srv      *nbd.Server
	listener net.Listener
	exports  []*export // newest last
}

type export struct {
	id, name     string
	backend      *graph.Child
	shuttingDown bool
}

// StartNBDFlat implements --nbd-server (flat SocketAddress).
func (d *Daemon) StartNBDFlat(tree any, keyval bool) error {
	return d.startNBD(tree, keyval, false)
}

func (d *Daemon) startNBD(tree any, keyval, nested bool) error {
	dec := &qapi.Decoder{Keyval: keyval}
	var a nbdServerArgs
	if err := dec.Decode(tree, "", &a); err != nil {
		return err
	}
	sa, err := decodeSocketAddress(dec, a.Addr.V, "addr", nested)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.nbd != nil {
		return errors.New("NBD server already running")
	}
	var tc *tls.Config
	if a.TLSCreds != nil {
		o, ok := d.tls[*a.TLSCreds]
		if !ok {
			return fmt.Errorf("No TLS credentials with id '%s'", *a.TLSCreds)
		}
		if o.endpoint != "server" {
			return errors.New("Expected TLS credentials for a server endpoint")
		}
		tc = o.config
	}
	if a.TLSAuthz != nil {
		return errors.New("tls-authz is not supported by blockd")
	}
	maxConn := 100
	if a.MaxConnections != nil {
		maxConn = int(*a.MaxConnections)
	}
	l, err := sa.listen()
	if err != nil {
		return err
	}
	srv := nbd.NewServer(nbd.Options{TLSConfig: tc, MaxConnections: maxConn, Log: d.Log.WithField("component", "nbd")})
	d.nbd = &nbdState{srv: srv, listener: l}
	go func() { _ = srv.Serve(l) }()
	return nil
}

// stopNBD stops the server and deletes every export. d.mu is held.
func (d *Daemon) stopNBD() error {
	if d.nbd == nil {
		return errors.New("NBD server not running")
	}
	st := d.nbd
	for _, dev := range d.attached {
		_ = dev.Detach()
	}
	d.attached = nil
	for _, x := range append([]*export(nil), st.exports...) {
		if !x.shuttingDown {
			d.deleteExport(x, true)
		}
	}
	_ = st.srv.Close()
	d.nbd = nil
	return nil
}

type exportType string

func (exportType) EnumValues() []string {
	return []string{"nbd", "vhost-user-blk", "fuse", "vduse-blk"}
}

// blockExportArgs is BlockExportOptions with the nbd variant.
type blockExportArgs struct {
	Type            exportType `json:"type"`
	ID              string     `json:"id"`
	FixedIothread   *bool      `json:"fixed-iothread,omitempty"`
	Iothread        *string    `json:"iothread,omitempty"`
	NodeName        string     `json:"node-name"`
	Writable        *bool      `json:"writable,omitempty"`
	Writethrough    *bool      `json:"writethrough,omitempty"`
	Name            *string    `json:"name,omitempty"`
	Description     *string    `json:"description,omitempty"`
	Bitmaps         []any      `json:"bitmaps,omitempty"`
	AllocationDepth *bool      `json:"allocation-depth,omitempty"`
}

// AddExport implements --export and block-export-add.
func (d *Daemon) AddExport(ctx context.Context, tree any, keyval bool) error {
	obj, ok := tree.(map[string]any)
	if !ok {
		return errors.New("Invalid parameter type for 'null', expected: object")
	}
	var a blockExportArgs
	if t, ok := obj["type"].(string); ok && t != "nbd" {
		var base struct {
			Type exportType `json:"type"`
		}
		if err := qapi.Decode(map[string]any{"type": t}, keyval, &base); err != nil {
			return err
		}
		return fmt.Errorf("export type '%s' is not supported by blockd", t)
	}
	if err := qapi.Decode(obj, keyval, &a); err != nil {
		return err
	}
	return d.addExport(a)
}

func (d *Daemon) addExport(a blockExportArgs) error {
	if len(a.Bitmaps) > 0 {
		return errors.New("dirty bitmaps are not supported by blockd")
	}
	if a.AllocationDepth != nil && *a.AllocationDepth {
		return errors.New("allocation-depth is not supported by blockd")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.nbd == nil {
		return errors.New("NBD server not running")
	}
	if !qapi.WellFormedID(a.ID) {
		return fmt.Errorf("Invalid block export id '%s'", a.ID)
	}
	for _, x := range d.nbd.exports {
		if x.id == a.ID {
			return fmt.Errorf("Block export id '%s' is already in use", a.ID)
		}
	}
	name := a.NodeName
	if a.Name != nil {
		name = *a.Name
	}
	if len(name) > 4096 {
		return fmt.Errorf("export name '%s' too long", name)
	}
	desc := ""
	if a.Description != nil {
		desc = *a.Description
		if len(desc) > 4096 {
			return fmt.Errorf("description '%s' too long", desc)
		}
	}
	for _, x := range d.nbd.exports {
		if x.name == name && !x.shuttingDown {
			return fmt.Errorf("NBD server already has export named '%s'", name)
		}
	}
	b := d.Graph.Lookup(a.NodeName)
	if b == nil {
		return fmt.Errorf("Cannot find device='%s' nor node-name='%s'", a.NodeName, a.NodeName)
	}
	writable := a.Writable != nil && *a.Writable
	if writable && b.ReadOnly() {
		return errors.New("Cannot export read-only node as writable")
	}
	// QEMU's nbd_export_create: consistent read, write when writable, and
	// everything shared but resize (so no other process may resize the
	// image under the export: its lock byte 203).
	perm := graph.PermRead
	if writable {
		perm |= graph.PermWrite
	}
	be, err := d.Graph.NewBackend(a.NodeName, "", perm, graph.PermAll&^graph.PermResize)
	if err != nil {
		return err
	}
	if err := d.nbd.srv.AddExport(&nbd.Export{Name: name, Description: desc, Node: exportNode{be}, ReadOnly: !writable}); err != nil {
		d.Graph.ReleaseBackend(be)
		return err
	}
	d.nbd.exports = append(d.nbd.exports, &export{id: a.ID, name: name, backend: be})
	return nil
}

// exportNode is what an NBD export serves: the node through its backend
// edge, with block status answered for the whole backing chain (what
// base:allocation means to clients, as in QEMU).
type exportNode struct{ *graph.Child }

// BlockStatus implements graph.BlockStatuser.
func (e exportNode) BlockStatus(ctx context.Context, off, n int64) ([]graph.Extent, error) {
	return e.Child.BlockStatusAbove(ctx, off, n)
}

// deleteExport withdraws x; the BLOCK_EXPORT_DELETED event follows once its
// clients are gone. d.mu is held.
func (d *Daemon) deleteExport(x *export, hard bool) error {
	st := d.nbd
	done, err := st.srv.RemoveExport(x.name, hard)
	if err != nil {
		if errors.Is(err, graph.ErrInUse) && !hard {
			return fmt.Errorf("export '%s' still in use", x.id)
		}
		return err
	}
	x.shuttingDown = true
	go func() {
		<-done
		d.Graph.ReleaseBackend(x.backend)
		d.mu.Lock()
		for i, y := range st.exports {
			if y == x {
				st.exports = append(st.exports[:i], st.exports[i+1:]...)
				break
			}
		}
		d.mu.Unlock()
		d.QMP.Emit("BLOCK_EXPORT_DELETED", struct {
			ID string `json:"id"`
		}{x.id})
	}()
	return nil
}

type removeMode string

func (removeMode) EnumValues() []string { return []string{"safe", "hard"} }

type exportDelArgs struct {
	ID   string      `json:"id"`
	Mode *removeMode `json:"mode,omitempty"`
}

func (d *Daemon) delExport(id string, mode *removeMode) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.nbd != nil {
		for _, x := range d.nbd.exports {
			if x.id != id {
				continue
			}
			if x.shuttingDown {
				return fmt.Errorf("Export '%s' is already shutting down", id)
			}
			return d.deleteExport(x, mode != nil && *mode == "hard")
		}
	}
	return fmt.Errorf("Export '%s' is not found", id)
}

// BlockExportInfo is an entry of query-block-exports.
type BlockExportInfo struct {
	ID           string `json:"id"`
	Type         string `json:"type"`
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

func (d *Daemon) queryExports() []BlockExportInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []BlockExportInfo{}
	if d.nbd == nil {
		return out
	}
	for i := len(d.nbd.exports) - 1; i >= 0; i-- {
		x := d.nbd.exports[i]
		out = append(out, BlockExportInfo{ID: x.id, Type: "nbd", NodeName: x.backend.BDS().Name(), ShuttingDown: x.shuttingDown})
	}
	return out
}

type nbdServerAddArgs struct {
	Device      string  `json:"device"`
	Name        *string `json:"name,omitempty"`
	Description *string `json:"description,omitempty"`
	Writable    *bool   `json:"writable,omitempty"`
	Bitmap      *string `json:"bitmap,omitempty"`
}

type nbdServerRemoveArgs struct {
	Name string      `json:"name"`
	Mode *removeMode `json:"mode,omitempty"`
}

func (d *Daemon) registerNBD() {
	qmp.Handle(d.QMP, "nbd-server-start", func(ctx context.Context, m *qmp.Monitor, a *qmp.Args) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.startNBD(map[string]any(*a), false, true)
	})
	qmp.Handle(d.QMP, "nbd-server-stop", func(ctx context.Context, m *qmp.Monitor, a *qmp.Empty) (*qmp.Empty, error) {
		d.mu.Lock()
		defer d.mu.Unlock()
		return &qmp.Empty{}, d.stopNBD()
	})
	qmp.Handle(d.QMP, "block-export-add", func(ctx context.Context, m *qmp.Monitor, a *qmp.Args) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.AddExport(ctx, map[string]any(*a), false)
	})
	qmp.Handle(d.QMP, "block-export-del", func(ctx context.Context, m *qmp.Monitor, a *exportDelArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.delExport(a.ID, a.Mode)
	})
	qmp.Handle(d.QMP, "query-block-exports", func(ctx context.Context, m *qmp.Monitor, a *qmp.Empty) ([]BlockExportInfo, error) {
		return d.queryExports(), nil
	})
	qmp.Handle(d.QMP, "nbd-server-add", func(ctx context.Context, m *qmp.Monitor, a *nbdServerAddArgs) (*qmp.Empty, error) {
		if a.Bitmap != nil {
			return nil, errors.New("dirty bitmaps are not supported by blockd")
		}
		name := a.Device
		if a.Name != nil {
			name = *a.Name
		}
		return &qmp.Empty{}, d.addExport(blockExportArgs{Type: "nbd", ID: name, NodeName: a.Device, Name: &name, Description: a.Description, Writable: a.Writable})
	})
	qmp.Handle(d.QMP, "nbd-server-remove", func(ctx context.Context, m *qmp.Monitor, a *nbdServerRemoveArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.delExport(a.Name, a.Mode)
	})
}
