package blockdimg

import (
	"strings"
)

// This file is a small getopt_long as glibc implements it, because
// qemu-img's command lines rely on its details: options and operands may
// be mixed (operands are permuted to the end), "--" ends the options,
// short options cluster ("-qU", "-fraw"), long options take "=value" or the
// next argument and may be abbreviated to any unambiguous prefix.

// longOpt describes a long option; id is what the parser reports for it
// (a short option letter or an optXxx constant).
type longOpt struct {
	name   string
	hasArg bool
	id     int
}

// Long option ids that have no short form (qemu-img's OPTION_*).
const (
	optOutput = 256 + iota
	optBackingChain
	optObject
	optImageOpts
	optPattern
	optFlushInterval
	optNoDrain
	optTargetImageOpts
	optSize
	optPreallocation
	optShrink
	optSalvage
	optTargetIsZero
	optBitmaps
	optForce
	optSkipBroken
	optStartOffset
	optMaxLength
)

// parsedOpt is one option found on the command line. raw is the argument
// it came from, as qemu-img quotes it in errors.
type parsedOpt struct {
	id  int
	arg string
	raw string
}

// getopt parses args (without the command name) against a short option
// string ("f:hq": a letter followed by ':' takes an argument) and a list of
// long options. It returns the options in order and the operands.
func getopt(args []string, short string, long []longOpt) ([]parsedOpt, []string, error) {
	short = strings.TrimPrefix(short, "+")
	short = strings.TrimPrefix(short, ":")
	var opts []parsedOpt
	var operands []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			operands = append(operands, args[i+1:]...)
			return opts, operands, nil
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			lo, err := findLong(long, name, a)
			if err != nil {
				return nil, nil, err
			}
			p := parsedOpt{id: lo.id, raw: a}
			if lo.hasArg {
				if hasVal {
					p.arg = val
				} else {
					if i+1 >= len(args) {
						return nil, nil, usagef("missing argument for option '%s'", a)
					}
					i++
					p.arg = args[i]
				}
			} else if hasVal {
				return nil, nil, usagef("unrecognized option '%s'", a)
			}
			opts = append(opts, p)
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				c := a[j]
				k := strings.IndexByte(short, c)
				if k < 0 || c == ':' {
					return nil, nil, usagef("unrecognized option '%s'", a)
				}
				p := parsedOpt{id: int(c), raw: a}
				if k+1 < len(short) && short[k+1] == ':' {
					if j+1 < len(a) {
						p.arg = a[j+1:]
					} else {
						if i+1 >= len(args) {
							return nil, nil, usagef("missing argument for option '%s'", a)
						}
						i++
						p.arg = args[i]
					}
					opts = append(opts, p)
					break
				}
				opts = append(opts, p)
			}
		default:
			operands = append(operands, a)
		}
	}
	return opts, operands, nil
}

// findLong resolves a long option name, allowing unambiguous prefixes as
// glibc does (an exact match always wins).
func findLong(long []longOpt, name, raw string) (longOpt, error) {
	var match []longOpt
	for _, lo := range long {
		if lo.name == name {
			return lo, nil
		}
		if strings.HasPrefix(lo.name, name) && name != "" {
			match = append(match, lo)
		}
	}
	if len(match) == 1 {
		return match[0], nil
	}
	if len(match) > 1 {
		// Prefixes of several names that mean the same are fine.
		same := true
		for _, m := range match[1:] {
			if m.id != match[0].id || m.hasArg != match[0].hasArg {
				same = false
			}
		}
		if same {
			return match[0], nil
		}
	}
	return longOpt{}, usagef("unrecognized option '%s'", raw)
}
