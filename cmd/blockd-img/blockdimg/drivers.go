package blockdimg

import (
	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/drivers/nbd"
	"blockd/drivers/null"
	"blockd/drivers/qcow2"
	"blockd/drivers/raw"
	"blockd/graph"
)

// drivers returns the block drivers blockd-img registers, as cmd/blockd
// does for the daemon.
func drivers() []*graph.Driver {
	return []*graph.Driver{file.Driver(), raw.Driver(), null.Driver(), luks.Driver(), qcow2.Driver(), nbd.Driver()}
}

func driverNames() []string {
	var out []string
	for _, d := range drivers() {
		out = append(out, d.Name)
	}
	return out
}
