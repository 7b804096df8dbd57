package bench

import (
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// benchOptions returns the options BLOCKD_BENCH selects ("1": quick,
// "full": the default run) or skips the test. A missing peer tool is a
// failure under CI=true and a skip otherwise.
func benchOptions(tb testing.TB) Options {
	tb.Helper()
	var o Options
	switch os.Getenv("BLOCKD_BENCH") {
	case "1":
		o = QuickOptions()
	case "full":
		o = DefaultOptions()
	default:
		tb.Skip("set BLOCKD_BENCH=1 (quick) or BLOCKD_BENCH=full to run blockd and qemu-storage-daemon side by side")
	}
	if miss := MissingTools(); len(miss) > 0 {
		if os.Getenv("CI") == "true" {
			tb.Fatalf("peer tools missing (CI=true): %s", strings.Join(miss, ", "))
		}
		tb.Skipf("peer tools missing: %s", strings.Join(miss, ", "))
	}
	if _, err := os.Stat(o.Dir); err != nil {
		o.Dir = tb.TempDir()
	}
	o.Blockd = buildBlockd(tb)
	return o
}

func buildBlockd(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "blockd")
	if out, err := exec.Command("go", "build", "-o", bin, "blockd/cmd/blockd").CombinedOutput(); err != nil {
		tb.Fatalf("building blockd: %v\n%s", err, out)
	}
	return bin
}

type logWriter struct{ tb testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.tb.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestSideBySide runs every setup and workload against both daemons and
// checks that each produced figures.
func TestSideBySide(t *testing.T) {
	o := benchOptions(t)
	o.Log = logWriter{t}
	res, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	res.WriteText(&sb, o.Reps > 1)
	t.Log("\n" + sb.String())
	nbdkit := map[string]bool{}
	for _, c := range configs {
		nbdkit[c.Name] = c.NBDKit != nil && !o.NoNBDKit && NBDKitAvailable(context.Background(), c.NBDKitFilter)
	}
	for _, r := range res.Rows {
		for _, d := range Daemons {
			if (d == QSD && r.Config == "luks-detached") || (d == NBDKit && !nbdkit[r.Config]) {
				continue
			}
			if v := r.Median(d); math.IsNaN(v) || v <= 0 {
				t.Errorf("%s %s: %s figure %v", r.Config, r.Metric.Name, d, v)
			}
		}
	}
	if res.Row("raw", "randread-4k-qd32-c1") == nil || res.Row("luks", "write-1m-qd8-c4") == nil ||
		res.Row("chain-qcow2", "stream") == nil || res.Row("chain-luks", "commit") == nil {
		t.Error("rows missing from the report")
	}
}

// BenchmarkSideBySide runs each setup once (both daemons, Reps
// repetitions) and reports every row as a sub-benchmark with the medians
// and the blockd/QSD ratio as metrics. ns/op is not meaningful here and is
// suppressed.
//
//	BLOCKD_BENCH=1 go test -run '^$' -bench SideBySide ./bench
func BenchmarkSideBySide(b *testing.B) {
	o := benchOptions(b)
	for _, c := range ConfigNames() {
		o.Configs = []string{c}
		res, err := Run(context.Background(), o)
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range res.Rows {
			b.Run(c+"/"+r.Metric.Name, func(b *testing.B) {
				unit := strings.NewReplacer("/", "-per-", " ", "", "µ", "u").Replace(r.Metric.Unit)
				for _, d := range []Daemon{QSD, NBDKit} {
					if v := r.Median(d); !math.IsNaN(v) {
						b.ReportMetric(v, string(d)+"-"+unit)
						b.ReportMetric(r.RatioTo(d), "blockd/"+string(d))
					}
				}
				b.ReportMetric(r.Median(Blockd), "blockd-"+unit)
				b.ReportMetric(0, "ns/op")
			})
		}
	}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is not NaN")
	}
}

// TestParseFio parses a trimmed fio 3.33 JSON report with a warning line
// before it, as fio prints when a job has a note.
func TestParseFio(t *testing.T) {
	out := `note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"bench","error":0,
 "read":{"io_bytes":0,"bw_bytes":0,"iops":0.0,"total_ios":0,"clat_ns":{"percentile":{}}},
 "write":{"io_bytes":1048576,"bw_bytes":104857600,"iops":25600.5,"total_ios":256,
  "clat_ns":{"percentile":{"50.000000":1000,"99.000000":123456}}}}]}`
	st, err := parseFio([]byte(out), "randwrite")
	if err != nil {
		t.Fatal(err)
	}
	if st.IOPS != 25600.5 || st.BW != 104857600 || st.P99 != 123456 {
		t.Fatalf("parsed %+v", st)
	}
	if _, err := parseFio([]byte(out), "read"); err == nil {
		t.Fatal("a report without reads parsed as a read workload")
	}
}

func TestReport(t *testing.T) {
	res := newResults(QuickOptions())
	m := &Metric{Name: "w", Label: "work", Unit: "kIOPS", CPUUnit: "CPU µs/IO"}
	res.add("raw", m, QSD, sample{10, 20})
	res.add("raw", m, Blockd, sample{15, 10})
	res.add("raw", m, Blockd, sample{17, 12})
	r := res.Row("raw", "w")
	if r.Ratio() != 1.6 || !r.Better() {
		t.Fatalf("ratio %v better %v", r.Ratio(), r.Better())
	}
	var sb strings.Builder
	if err := res.WriteMarkdown(&sb, true); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(sb.String(), "| raw | work | kIOPS ↑ | 10.00 | 16.00 (15.00–17.00) | **1.60** | 20.00 / 11.00 CPU µs/IO |") {
		t.Fatalf("markdown:\n%s", sb.String())
	}

	// With nbdkit figures, a third column and a second ratio appear; rows
	// without nbdkit show dashes.
	res.add("raw", m, NBDKit, sample{8, 40})
	res.add("luks", m, QSD, sample{5, 50})
	res.add("luks", m, Blockd, sample{10, 10})
	sb.Reset()
	if err := res.WriteMarkdown(&sb, false); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| config | workload | unit | QSD | blockd | nbdkit | blockd/QSD | blockd/nbdkit | server CPU QSD / blockd / nbdkit |",
		"| raw | work | kIOPS ↑ | 10.00 | 16.00 | 8.000 | **1.60** | **2.00** | 20.00 / 11.00 / 40.00 CPU µs/IO |",
		"| luks | work | kIOPS ↑ | 5.000 | 10.00 | — | **2.00** | — | 50.00 / 10.00 / — CPU µs/IO |",
	} {
		if !strings.Contains(sb.String(), want) {
			t.Fatalf("markdown without %q:\n%s", want, sb.String())
		}
	}
}
