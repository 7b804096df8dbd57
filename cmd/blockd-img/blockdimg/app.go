// Package blockdimg is blockd-img, a qemu-img compatible tool built on
// blockd's block graph and drivers: every image is opened, created,
// amended and copied through graph nodes, never by format code of its own.
//
// Each command follows its qemu-img 7.2 counterpart (qemu-img.c): the same
// options, output layouts and exit codes. Differences are listed in
// docs/blockd-img.md.
package blockdimg

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sort"
	"strings"
)

// Version is the version blockd-img reports.
const Version = "0.1.0"

// Prog is the program name used in messages.
const Prog = "blockd-img"

// exitError carries a command's exit status with an optional message.
type exitError struct {
	code int
	msg  string // printed as "blockd-img: msg" when not empty
	// usage adds the "Try 'blockd-img --help'" line.
	usage bool
}

func (e *exitError) Error() string { return e.msg }

// usagef is a command-line error: message, help hint, exit status 1.
func usagef(format string, a ...any) error {
	return &exitError{code: 1, msg: fmt.Sprintf(format, a...), usage: true}
}

// failf is an error with exit status 1.
func failf(format string, a ...any) error {
	return &exitError{code: 1, msg: fmt.Sprintf(format, a...)}
}

// exitCode is a non-zero exit status with nothing (more) to print.
func exitCode(code int) error { return &exitError{code: code} }

// withCode gives err exit status code.
func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return &exitError{code: code, msg: ee.msg, usage: ee.usage}
	}
	return &exitError{code: code, msg: err.Error()}
}

// command is one verb.
type command struct {
	name  string
	run   func(e *env, args []string) error
	usage string
}

var commands []command

func init() {
	commands = []command{
		{"amend", cmdAmend, "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename"},
		{"bench", cmdBench, "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename"},
		{"check", cmdCheck, "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename"},
		{"commit", cmdCommit, "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename"},
		{"compare", cmdCompare, "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2"},
		{"convert", cmdConvert, "convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename"},
		{"create", cmdCreate, "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]"},
		{"info", cmdInfo, "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename"},
		{"map", cmdMap, "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename"},
		{"measure", cmdMeasure, "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] filename]"},
		{"snapshot", cmdSnapshot, "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename"},
		{"rebase", cmdRebase, "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename"},
		{"resize", cmdResize, "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size"},
	}
}

// Main runs blockd-img with args (without the program name) and returns
// the exit status. Nothing panics out of it: an unexpected failure is one
// line on stderr and status 1.
func Main(args []string, stdout, stderr io.Writer) (code int) {
	defer func() {
		if r := recover(); r != nil {
			if os.Getenv("BLOCKD_IMG_TRACE") != "" {
				fmt.Fprintf(stderr, "%s", debug.Stack())
			}
			fmt.Fprintf(stderr, "%s: internal error: %v\n", Prog, r)
			code = 1
		}
	}()
	e := newEnv(context.Background(), stdout, stderr)
	defer e.close()
	err := run(e, args)
	return report(stderr, err)
}

func report(stderr io.Writer, err error) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if !errors.As(err, &ee) {
		printErr(stderr, err.Error())
		return 1
	}
	if ee.msg != "" {
		printErr(stderr, ee.msg)
	}
	if ee.usage {
		fmt.Fprintf(stderr, "Try '%s --help' for more information\n", Prog)
	}
	return ee.code
}

// printErr prints a message as qemu-img's error_report does: the program
// name before the first line; a message may carry hint lines after it.
func printErr(w io.Writer, msg string) {
	// A hint without a final newline (QEMU's error_append_hint text is
	// printed as it is) ends with noNewline.
	if m, ok := strings.CutSuffix(msg, noNewline); ok {
		fmt.Fprintf(w, "%s: %s", Prog, m)
		return
	}
	fmt.Fprintf(w, "%s: %s\n", Prog, strings.TrimRight(msg, "\n"))
}

// noNewline ends a message that qemu-img prints without a final newline.
const noNewline = "\x00"

func run(e *env, args []string) error {
	if len(args) < 1 {
		return usagef("Not enough arguments")
	}
	long := []longOpt{{"help", false, 'h'}, {"version", false, 'V'}, {"trace", true, 'T'}}
	// Global options come before the command (getopt with '+').
	i := 0
	for ; i < len(args) && strings.HasPrefix(args[i], "-") && args[i] != "-"; i++ {
		a := args[i]
		if a == "--" {
			i++
			break
		}
		if name, val, ok := kdfLimitOpt(args, &i); ok {
			if err := e.setKDFLimit(name, val); err != nil {
				return err
			}
			continue
		}
		opts, _, err := getopt([]string{a}, "hVT:", long)
		if err != nil {
			var ee *exitError
			if errors.As(err, &ee) && strings.HasPrefix(ee.msg, "missing argument") && i+1 < len(args) {
				i++
				continue // -T takes the next argument; tracing is not supported
			}
			return err
		}
		for _, o := range opts {
			switch o.id {
			case 'h':
				printHelp(e.stdout)
				return nil
			case 'V':
				fmt.Fprintf(e.stdout, "%s version %s (qemu-img 7.2 compatible)\n", Prog, Version)
				return nil
			}
		}
	}
	if i >= len(args) {
		return nil
	}
	name := args[i]
	for _, c := range commands {
		if c.name == name {
			return c.run(e, args[i+1:])
		}
	}
	return usagef("Command not found: %s", name)
}

func printHelp(w io.Writer) {
	fmt.Fprintf(w, "%s version %s (qemu-img 7.2 compatible)\n", Prog, Version)
	fmt.Fprintf(w, "usage: %s [standard options] command [command options]\n", Prog)
	fmt.Fprint(w, `Disk image utility built on blockd's block drivers

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit
    '--max-kdf-memory SIZE'  largest argon2 memory cost of a LUKS keyslot
                         to unlock (default 1G, at most 4G)
    '--max-kdf-time DURATION'  longest estimated time of unlocking one LUKS
                         keyslot on this CPU (default 30s)

Command syntax:
`)
	for _, c := range commands {
		fmt.Fprintf(w, "  %s\n", c.usage)
	}
	fmt.Fprint(w, `
Command parameters:
  'filename' is a disk image filename, a 'json:{...}' description, or with
    --image-opts a list of options such as
    'driver=luks,file.filename=d.img,header.filename=h.img,key-secret=sec0'
  'objectdef' is an object definition such as 'secret,id=sec0,file=pw.txt'
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image: 'none',
    'writeback' (default, except for convert), 'writethrough', 'directsync'
    and 'unsafe' (default for convert)
  'size' is the disk image size in bytes. Optional suffixes 'k' or 'K'
    (kilobyte, 1024), 'M', 'G', 'T', 'P' and 'E' are supported. 'b' is ignored.
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for the output to be sparse during conversion
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors.

Parameters to convert subcommand:
  '-m' specifies how many requests work in parallel (defaults to 8)
  '-W' allow to write to the target out of order rather than sequential

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Supported formats:`)
	names := append([]string(nil), driverNames()...)
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, " %s", n)
	}
	fmt.Fprintln(w)
}

// helpRequested handles -h inside a command.
func helpRequested(e *env) error {
	printHelp(e.stdout)
	return nil
}
