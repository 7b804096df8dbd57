package luks

import (
	"context"

	"blockd/graph"
)

var _ graph.Reopener = (*node)(nil)

// PrepareReopen implements graph.Reopener: a luks node has nothing to
// write or reopen (its file follows through the graph, and its
// permissions with it); keyslot updates are refused or allowed from
// commit on.
func (n *node) PrepareReopen(_ context.Context, readOnly bool) (commit, abort func(), err error) {
	return func() {
		n.amendMu.Lock()
		n.readOnly = readOnly
		n.amendMu.Unlock()
	}, nil, nil
}
