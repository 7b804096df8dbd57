package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// Results are a run's measurements, one Row per configuration and metric
// in the order they were first measured.
type Results struct {
	Options Options
	Rows    []*Row
	// Notes say what was skipped or measured for blockd alone, and why.
	Notes []string
}

// Row is one line of the report: all samples of one metric on one
// configuration, per daemon.
type Row struct {
	Config string
	Metric *Metric
	Values map[Daemon][]float64
	CPU    map[Daemon][]float64
}

func newResults(o Options) *Results { return &Results{Options: o} }

func (res *Results) add(config string, m *Metric, d Daemon, s sample) {
	var row *Row
	for _, r := range res.Rows {
		if r.Config == config && r.Metric.Name == m.Name {
			row = r
			break
		}
	}
	if row == nil {
		row = &Row{Config: config, Metric: m, Values: map[Daemon][]float64{}, CPU: map[Daemon][]float64{}}
		res.Rows = append(res.Rows, row)
	}
	row.Values[d] = append(row.Values[d], s.value)
	if m.CPUUnit != "" {
		row.CPU[d] = append(row.CPU[d], s.cpu)
	}
}

// Row returns the row of a configuration and metric name, or nil.
func (res *Results) Row(config, metric string) *Row {
	for _, r := range res.Rows {
		if r.Config == config && r.Metric.Name == metric {
			return r
		}
	}
	return nil
}

// Median returns the median of d's figures (NaN when there are none).
func (r *Row) Median(d Daemon) float64 { return median(r.Values[d]) }

// CPUMedian returns the median of d's server CPU figures (NaN when none).
func (r *Row) CPUMedian(d Daemon) float64 { return median(r.CPU[d]) }

// Ratio is blockd's median over QSD's (NaN when either is missing).
func (r *Row) Ratio() float64 { return r.RatioTo(QSD) }

// RatioTo is blockd's median over d's (NaN when either is missing).
func (r *Row) RatioTo(d Daemon) float64 { return r.Median(Blockd) / r.Median(d) }

// Better says whether blockd's median is the better figure.
func (r *Row) Better() bool {
	if r.Metric.LowerBetter {
		return r.Median(Blockd) < r.Median(QSD)
	}
	return r.Median(Blockd) > r.Median(QSD)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "—"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.1f", v)
	case a >= 10:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// spread is "min–max" of a daemon's figures when there are several.
func spread(v []float64) string {
	if len(v) < 2 {
		return ""
	}
	return fmt.Sprintf(" (%s–%s)", num(slices.Min(v)), num(slices.Max(v)))
}

// peers returns the servers with figures in the report: QSD and blockd
// always, nbdkit when it ran.
func (res *Results) peers() []Daemon {
	p := []Daemon{QSD, Blockd}
	for _, r := range res.Rows {
		if len(r.Values[NBDKit]) > 0 {
			return append(p, NBDKit)
		}
	}
	return p
}

// others are the peers blockd is compared with.
func others(peers []Daemon) []Daemon {
	return slices.DeleteFunc(slices.Clone(peers), func(d Daemon) bool { return d == Blockd })
}

var peerTitle = map[Daemon]string{QSD: "QSD", Blockd: "blockd", NBDKit: "nbdkit"}

func (res *Results) header() []string {
	h := []string{"config", "workload", "unit"}
	peers := res.peers()
	var names []string
	for _, d := range peers {
		h = append(h, peerTitle[d])
		names = append(names, peerTitle[d])
	}
	for _, d := range others(peers) {
		h = append(h, "blockd/"+peerTitle[d])
	}
	return append(h, "server CPU "+strings.Join(names, " / "))
}

func ratioCell(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "—"
	}
	return fmt.Sprintf("%.2f", x)
}

func (r *Row) cells(peers []Daemon, spreads, bold bool) []string {
	unit := r.Metric.Unit
	switch {
	case r.Metric.Info:
	case r.Metric.LowerBetter:
		unit += " ↓"
	default:
		unit += " ↑"
	}
	c := []string{r.Config, r.Metric.Label, unit}
	var cpus []string
	for _, d := range peers {
		v := num(r.Median(d))
		if spreads {
			v += spread(r.Values[d])
		}
		c = append(c, v)
		cpus = append(cpus, num(r.CPUMedian(d)))
	}
	for _, d := range others(peers) {
		x := ratioCell(r.RatioTo(d))
		if bold && x != "—" && !r.Metric.Info {
			x = "**" + x + "**"
		}
		c = append(c, x)
	}
	cpu := ""
	if r.Metric.CPUUnit != "" {
		cpu = strings.Join(cpus, " / ") + " " + r.Metric.CPUUnit
	}
	return append(c, cpu)
}

// WriteText prints the table for a terminal. With spreads, each median is
// followed by the minimum and maximum of its repetitions.
func (res *Results) WriteText(w io.Writer, spreads bool) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(res.header(), "\t"))
	peers := res.peers()
	for _, r := range res.Rows {
		fmt.Fprintln(tw, strings.Join(r.cells(peers, spreads, false), "\t"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return res.writeNotes(w)
}

// WriteMarkdown prints the table as Markdown.
func (res *Results) WriteMarkdown(w io.Writer, spreads bool) error {
	h := res.header()
	fmt.Fprintf(w, "| %s |\n|%s\n", strings.Join(h, " | "), strings.Repeat("---|", len(h)))
	peers := res.peers()
	for _, r := range res.Rows {
		c := r.cells(peers, spreads, true)
		if r.Config == "convert" {
			c[0] = "convert (qemu-img / blockd-img)"
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(c, " | "))
	}
	fmt.Fprintln(w)
	return res.writeNotes(w)
}

func (res *Results) writeNotes(w io.Writer) error {
	o := res.Options
	_, err := fmt.Fprintf(w, "\nMedians of %d repetition(s); disk %d MiB; fio %v after %v ramp. ↑ higher is better, ↓ lower is better; "+
		"ratios are blockd's figure over the peer's. Server CPU is the daemon's user+system time per unit of work. "+
		"Convert rows compare qemu-img (QSD column) with blockd-img.\n",
		o.Reps, o.Size>>20, o.Runtime, o.Ramp)
	for _, n := range res.Notes {
		if _, err := fmt.Fprintf(w, "- %s\n", n); err != nil {
			return err
		}
	}
	return err
}
