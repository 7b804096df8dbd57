package blockdimg

import (
	"fmt"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
)

// progress is the -p progress bar (on stdout, like qemu-img's). A nil or
// disabled progress does nothing, so callers need not check.
type progress struct {
	mu  sync.Mutex // serialises updates of bar from parallel workers
	bar *progressbar.ProgressBar
	e   *env
}

// newProgress returns a bar counting to total (bytes when bytes is set).
func newProgress(e *env, enabled bool, total int64, desc string) *progress {
	if !enabled {
		return nil
	}
	opts := []progressbar.Option{
		progressbar.OptionSetWriter(e.stdout),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100 * time.Millisecond),
		progressbar.OptionSetRenderBlankState(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(e.stdout) }),
	}
	if desc != "amend" {
		opts = append(opts, progressbar.OptionShowBytes(true), progressbar.OptionUseIECUnits(true))
	}
	if total <= 0 {
		total = 1
	}
	return &progress{bar: progressbar.NewOptions64(total, opts...), e: e}
}

// add advances the bar by n.
func (p *progress) add(n int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	_ = p.bar.Add64(n)
	p.mu.Unlock()
}

// set moves the bar to n.
func (p *progress) set(n int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	_ = p.bar.Set64(n)
	p.mu.Unlock()
}

// finish completes the bar after success.
func (p *progress) finish() {
	if p == nil {
		return
	}
	p.mu.Lock()
	_ = p.bar.Finish()
	p.mu.Unlock()
}

// abort ends the bar's line after a failure.
func (p *progress) abort() {
	if p == nil {
		return
	}
	p.mu.Lock()
	_ = p.bar.Exit()
	fmt.Fprintln(p.e.stdout)
	p.mu.Unlock()
}
