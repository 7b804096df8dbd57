package daemon

import (
	"context"
	"fmt"

	"blockd/graph"
	"blockd/qmp"
)

type nodeNameArgs struct {
	NodeName string `json:"node-name"`
}

type queryNodesArgs struct {
	Flat *bool `json:"flat,omitempty"`
}

// AddBlockdev implements --blockdev and blockdev-add.
func (d *Daemon) AddBlockdev(ctx context.Context, tree any, keyval bool) error {
	_, err := d.Graph.Add(ctx, tree, keyval)
	return err
}

func (d *Daemon) registerBlock() {
	qmp.Handle(d.QMP, "blockdev-add", func(ctx context.Context, m *qmp.Monitor, a *qmp.Args) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.AddBlockdev(ctx, map[string]any(*a), false)
	})
	qmp.Handle(d.QMP, "blockdev-del", func(ctx context.Context, m *qmp.Monitor, a *nodeNameArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.Graph.Del(a.NodeName)
	})
	qmp.Handle(d.QMP, "query-named-block-nodes", func(ctx context.Context, m *qmp.Monitor, a *queryNodesArgs) ([]graph.BlockDeviceInfo, error) {
		return d.Graph.QueryNamedBlockNodes(a.Flat != nil && *a.Flat), nil
	})
	qmp.Handle(d.QMP, "query-block", func(ctx context.Context, m *qmp.Monitor, a *qmp.Empty) ([]struct{}, error) {
		// qemu-storage-daemon has no named BlockBackends.
		return []struct{}{}, nil
	})
	qmp.Handle(d.QMP, "block_resize", d.blockResize)
	d.registerReopen()
}

type blockResizeArgs struct {
	Device   *string `json:"device,omitempty"`
	NodeName *string `json:"node-name,omitempty"`
	Size     int64   `json:"size"`
}

func (d *Daemon) blockResize(ctx context.Context, m *qmp.Monitor, a *blockResizeArgs) (*qmp.Empty, error) {
	dev, name := "", ""
	if a.Device != nil {
		dev = *a.Device
	}
	if a.NodeName != nil {
		name = *a.NodeName
	}
	lookup := name
	if lookup == "" {
		lookup = dev
	}
	b := d.Graph.Lookup(lookup)
	if b == nil || (dev != "" && name != "") {
		return nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", dev, name)
	}
	if a.Size < 0 {
		return nil, fmt.Errorf("Parameter 'size' expects a >0 size")
	}
	c, err := d.Graph.NewBackend(b.Name(), "", graph.PermResize, graph.PermAll)
	if err != nil {
		return nil, err
	}
	defer d.Graph.ReleaseBackend(c)
	if err := c.Truncate(ctx, a.Size, graph.PreallocOff); err != nil {
		return nil, resizeError(err)
	}
	return &qmp.Empty{}, nil
}

func resizeError(err error) error {
	var oe *graph.OpError
	if e, ok := err.(*graph.OpError); ok {
		oe = e
		return fmt.Errorf("%v", oe.Err)
	}
	return err
}

// writeThresholdArgs is block-set-write-threshold's arguments.
type writeThresholdArgs struct {
	NodeName       string `json:"node-name"`
	WriteThreshold uint64 `json:"write-threshold"`
}

// registerWriteThreshold adds block-set-write-threshold (the event is
// raised by the graph's write path).
func (d *Daemon) registerWriteThreshold() {
	qmp.Handle(d.QMP, "block-set-write-threshold", func(ctx context.Context, m *qmp.Monitor, a *writeThresholdArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.Graph.SetWriteThreshold(a.NodeName, a.WriteThreshold)
	})
}
