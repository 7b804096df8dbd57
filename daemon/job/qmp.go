package job

import (
	"context"

	"blockd/qmp"
)

type idArgs struct {
	ID string `json:"id"`
}

// RegisterQMP adds query-jobs, job-cancel, job-pause, job-resume,
// job-complete, job-finalize and job-dismiss to s.
func RegisterQMP(s *qmp.Server, m *Manager) {
	qmp.Handle(s, "query-jobs", func(context.Context, *qmp.Monitor, *qmp.Empty) ([]Info, error) {
		return m.Query(), nil
	})
	for _, c := range []struct {
		name string
		fn   func(string) error
	}{
		{"job-cancel", m.Cancel},
		{"job-pause", m.Pause},
		{"job-resume", m.Resume},
		{"job-complete", m.Complete},
		{"job-finalize", m.Finalize},
		{"job-dismiss", m.Dismiss},
	} {
		qmp.Handle(s, c.name, func(_ context.Context, _ *qmp.Monitor, a *idArgs) (any, error) {
			return nil, c.fn(a.ID)
		})
	}
}
