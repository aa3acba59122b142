// Command streamload is the load side of bench/stream_bench.py, in Go so that the fake
// upstream and the clients cost a few microseconds per frame and stay out of the measurement
// even with 1,000 streams on a busy 2-core machine. Standard library only; stream_bench.py
// builds it with `go build` (offline) into its scratch directory.
//
//	streamload upstream -port N
//	    A fake Ollama: GET /api/tags, /api/ps, /api/version for discovery; POST /api/chat (and
//	    /api/generate) streams NDJSON frames, one write each, at scheduled times from the
//	    request's arrival: first + i*interval. Every frame carries its scheduled time as "t"
//	    (Unix nanoseconds). POST /bench/pace {"tokens","interval","first"} sets the pace
//	    (seconds).
//	streamload client -port N -streams S -tokens T [-ramp R] [-header "Name: value"] [-deadline D]
//	    S concurrent streamed chats (started over R seconds), each on its own connection; the
//	    chunked body is parsed by hand, so received chunks are counted as sent. Prints one JSON
//	    object: completed and failed streams (by reason), frames, chunks, and the delay of every
//	    frame (receive time - scheduled time) as p50/p99, and the first frame's p50, in ms.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: streamload upstream|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "upstream":
		upstream(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: streamload upstream|client [flags]")
		os.Exit(2)
	}
}

// --- upstream ---------------------------------------------------------------------------------

type pace struct {
	Tokens   int     `json:"tokens"`
	Interval float64 `json:"interval"`
	First    float64 `json:"first"`
}

var current atomic.Value // pace

const model = "bench"

func writeJSON(w http.ResponseWriter, v any) {
	body, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}

func stream(w http.ResponseWriter, r *http.Request) {
	arrived := time.Now()
	_, _ = io.Copy(io.Discard, r.Body)
	p := current.Load().(pace)
	flusher := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/x-ndjson")
	step := time.Duration(p.Interval * float64(time.Second))
	first := time.Duration(p.First * float64(time.Second))
	for i := 0; i < p.Tokens; i++ {
		scheduled := arrived.Add(first + time.Duration(i)*step)
		time.Sleep(time.Until(scheduled))
		frame := fmt.Sprintf(`{"t":%d,"model":"%s","created_at":"2026-01-01T00:00:00Z",`+
			`"message":{"role":"assistant","content":"tok "},"done":false}`+"\n",
			scheduled.UnixNano(), model)
		if _, err := io.WriteString(w, frame); err != nil {
			return
		}
		flusher.Flush()
	}
	time.Sleep(time.Until(arrived.Add(first + time.Duration(p.Tokens)*step)))
	final, _ := json.Marshal(map[string]any{
		"model": model, "created_at": "2026-01-01T00:00:00Z",
		"message": map[string]string{"role": "assistant", "content": ""},
		"done":    true, "done_reason": "stop", "total_duration": 1, "load_duration": 1,
		"prompt_eval_count": 8, "prompt_eval_duration": 1, "eval_count": p.Tokens,
		"eval_duration": 1,
	})
	_, _ = w.Write(append(final, '\n'))
}

func upstream(args []string) {
	flags := flag.NewFlagSet("upstream", flag.ExitOnError)
	port := flags.Int("port", 0, "listen on 127.0.0.1:port")
	_ = flags.Parse(args)
	current.Store(pace{Tokens: 10, Interval: 0.01})
	mux := http.NewServeMux()
	mux.HandleFunc("/api/chat", stream)
	mux.HandleFunc("/api/generate", stream)
	mux.HandleFunc("/bench/pace", func(w http.ResponseWriter, r *http.Request) {
		var p pace
		if err := json.NewDecoder(r.Body).Decode(&p); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		current.Store(p)
		writeJSON(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("/api/tags", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"models": []map[string]any{{
			"name": model + ":latest", "model": model + ":latest",
			"modified_at": "2026-01-01T00:00:00Z", "size": 1, "digest": strings.Repeat("0", 64),
			"details": map[string]string{"format": "gguf", "family": "bench"},
		}}})
	})
	mux.HandleFunc("/api/ps", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"models": []any{}})
	})
	mux.HandleFunc("/api/version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]string{"version": "0.12.6"})
	})
	server := &http.Server{Addr: fmt.Sprintf("127.0.0.1:%d", *port), Handler: mux}
	if err := server.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// --- client -----------------------------------------------------------------------------------

type result struct {
	Streams     int            `json:"streams"`
	Completed   int            `json:"completed"`
	Failed      map[string]int `json:"failed"`
	Frames      int            `json:"frames"`
	Chunks      int            `json:"chunks"`
	DelayP50    *float64       `json:"delay_p50_ms"`
	DelayP99    *float64       `json:"delay_p99_ms"`
	FirstP50    *float64       `json:"first_delay_p50_ms"`
	SteadyP50   *float64       `json:"steady_delay_p50_ms"`
	SteadyP99   *float64       `json:"steady_delay_p99_ms"`
	mu          sync.Mutex
	delays      []float64
	firstDelays []float64
	scheduled   []int64 // of each delay
	lastStart   int64   // the latest first frame's scheduled time
}

func (r *result) fail(why string) {
	r.mu.Lock()
	r.Failed[why]++
	r.mu.Unlock()
}

type streamOutcome struct {
	frames, chunks int
	done           bool
	delays         []float64
	scheduled      []int64
}

func oneStream(port int, request []byte, tokens int) (streamOutcome, string) {
	var out streamOutcome
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return out, "connect: " + err.Error()
	}
	defer conn.Close()
	if _, err := conn.Write(request); err != nil {
		return out, "send: " + err.Error()
	}
	reader := bufio.NewReaderSize(conn, 65536)
	status, err := reader.ReadString('\n')
	if err != nil {
		return out, "closed before the answer"
	}
	if fields := strings.Fields(status); len(fields) < 2 || fields[1] != "200" {
		return out, "HTTP " + strings.Join(fields[1:2], "")
	}
	for {
		line, err := reader.ReadString('\n')
		if err != nil {
			return out, "closed before the answer"
		}
		if line == "\r\n" {
			break
		}
	}
	var pending []byte
	for {
		sizeLine, err := reader.ReadString('\n')
		if err != nil {
			return out, "cut mid-stream"
		}
		size, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(sizeLine, ";", 2)[0]), 16, 64)
		if err != nil {
			return out, "bad chunk size"
		}
		data := make([]byte, size+2)
		if _, err := io.ReadFull(reader, data); err != nil {
			return out, "cut mid-stream"
		}
		received := time.Now().UnixNano()
		if size == 0 {
			break
		}
		out.chunks++
		pending = append(pending, data[:size]...)
		for {
			end := bytes.IndexByte(pending, '\n')
			if end < 0 {
				break
			}
			frame := pending[:end]
			pending = pending[end+1:]
			if bytes.HasPrefix(frame, []byte(`{"t":`)) {
				comma := bytes.IndexByte(frame, ',')
				scheduled, err := strconv.ParseInt(string(frame[5:comma]), 10, 64)
				if err != nil {
					return out, "bad frame"
				}
				out.delays = append(out.delays, float64(received-scheduled)/1e6)
				out.scheduled = append(out.scheduled, scheduled)
				out.frames++
			} else if len(bytes.TrimSpace(frame)) > 0 {
				var final map[string]any
				if err := json.Unmarshal(frame, &final); err != nil {
					return out, "bad frame"
				}
				if _, isError := final["error"]; isError {
					return out, "error frame"
				}
				out.done = final["done"] == true
				out.frames++
			}
		}
	}
	if !out.done || len(out.delays) != tokens {
		return out, fmt.Sprintf("incomplete (%d/%d frames, done=%v)", len(out.delays), tokens, out.done)
	}
	return out, ""
}

func percentile(values []float64, q float64) *float64 {
	if len(values) == 0 {
		return nil
	}
	sort.Float64s(values)
	index := int(q * float64(len(values)))
	if index >= len(values) {
		index = len(values) - 1
	}
	return &values[index]
}

func client(args []string) {
	flags := flag.NewFlagSet("client", flag.ExitOnError)
	port := flags.Int("port", 0, "server port on 127.0.0.1")
	streams := flags.Int("streams", 1, "concurrent streams")
	tokens := flags.Int("tokens", 10, "content frames per stream")
	ramp := flags.Float64("ramp", 0, "seconds over which the streams start")
	header := flags.String("header", "", `an extra request header, "Name: value"`)
	deadline := flags.Float64("deadline", 600, "seconds each stream may take")
	_ = flags.Parse(args)

	body, _ := json.Marshal(map[string]any{
		"model":    model,
		"messages": []map[string]string{{"role": "user", "content": "Tell me a story."}},
		"stream":   true,
		"options":  map[string]int{"num_predict": *tokens},
	})
	extra := ""
	if *header != "" {
		extra = *header + "\r\n"
	}
	request := []byte(fmt.Sprintf("POST /api/chat HTTP/1.1\r\nHost: localhost\r\n"+
		"Content-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s", extra, len(body), body))

	res := &result{Streams: *streams, Failed: map[string]int{}}
	var wg sync.WaitGroup
	for i := 0; i < *streams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			time.Sleep(time.Duration(*ramp * float64(i) / float64(*streams) * float64(time.Second)))
			done := make(chan struct{})
			var out streamOutcome
			var why string
			go func() {
				out, why = oneStream(*port, request, *tokens)
				close(done)
			}()
			select {
			case <-done:
			case <-time.After(time.Duration(*deadline * float64(time.Second))):
				res.fail("timed out")
				return
			}
			res.mu.Lock()
			defer res.mu.Unlock()
			res.Frames += out.frames
			res.Chunks += out.chunks
			res.delays = append(res.delays, out.delays...)
			res.scheduled = append(res.scheduled, out.scheduled...)
			if len(out.delays) > 0 {
				res.firstDelays = append(res.firstDelays, out.delays[0])
				if out.scheduled[0] > res.lastStart {
					res.lastStart = out.scheduled[0]
				}
			}
			if why != "" {
				res.Failed[why]++
			} else {
				res.Completed++
			}
		}(i)
	}
	wg.Wait()
	res.DelayP50 = percentile(res.delays, 0.5)
	p99 := percentile(res.delays, 0.99)
	res.DelayP99 = p99
	res.FirstP50 = percentile(res.firstDelays, 0.5)
	// Steady: the frames scheduled a second after the last stream's first frame, when every
	// stream runs and none is being admitted.
	var steady []float64
	for i, at := range res.scheduled {
		if at > res.lastStart+int64(time.Second) {
			steady = append(steady, res.delays[i])
		}
	}
	res.SteadyP50 = percentile(steady, 0.5)
	res.SteadyP99 = percentile(steady, 0.99)
	res.mu.Lock()
	defer res.mu.Unlock()
	encoded, _ := json.Marshal(res)
	fmt.Println(string(encoded))
}
