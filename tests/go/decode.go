// decode: Go's encoding/json view of a request body, bound the way Ollama binds it.
//
// Reads one JSON line per request from stdin: {"route": "<nzgw route id>", "body": "<body>"}
// and answers one JSON line: {"err": "...", "model": ..., "stream": ..., "cap": ...,
// "keep_alive": bool, "options": [...]}. The structs carry the json tags of Ollama's request
// types (api/types.go, openai/, anthropic/) for the fields that decide authorisation and
// accounting; everything else is json.RawMessage or a plain type so that decoding follows the
// same rules (case-insensitive keys, the last one wins, int fields refuse fractions).
// The standard library only: built by tests/test_go_differential.py with `go build`.
package main

import (
	"bufio"
	"encoding/json"
	"os"
)

type generateRequest struct {
	Model       string          `json:"model"`
	Prompt      string          `json:"prompt"`
	Suffix      string          `json:"suffix"`
	System      string          `json:"system"`
	Template    string          `json:"template"`
	Context     []int           `json:"context,omitempty"`
	Stream      *bool           `json:"stream,omitempty"`
	Raw         bool            `json:"raw,omitempty"`
	Format      json.RawMessage `json:"format,omitempty"`
	KeepAlive   json.RawMessage `json:"keep_alive,omitempty"`
	Images      [][]byte        `json:"images,omitempty"`
	Options     map[string]any  `json:"options"`
	Think       json.RawMessage `json:"think,omitempty"`
	Truncate    *bool           `json:"truncate,omitempty"`
	Shift       *bool           `json:"shift,omitempty"`
	Logprobs    bool            `json:"logprobs,omitempty"`
	TopLogprobs int             `json:"top_logprobs,omitempty"`
}

type message struct {
	Role       string          `json:"role"`
	Content    string          `json:"content"`
	Thinking   string          `json:"thinking,omitempty"`
	Images     [][]byte        `json:"images,omitempty"`
	ToolCalls  json.RawMessage `json:"tool_calls,omitempty"`
	ToolName   string          `json:"tool_name,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
}

type chatRequest struct {
	Model       string          `json:"model"`
	Messages    []message       `json:"messages"`
	Stream      *bool           `json:"stream,omitempty"`
	Format      json.RawMessage `json:"format,omitempty"`
	KeepAlive   json.RawMessage `json:"keep_alive,omitempty"`
	Tools       json.RawMessage `json:"tools,omitempty"`
	Options     map[string]any  `json:"options"`
	Think       json.RawMessage `json:"think,omitempty"`
	Truncate    *bool           `json:"truncate,omitempty"`
	Shift       *bool           `json:"shift,omitempty"`
	Logprobs    bool            `json:"logprobs,omitempty"`
	TopLogprobs int             `json:"top_logprobs,omitempty"`
}

type embedRequest struct {
	Model      string          `json:"model"`
	Input      any             `json:"input"`
	KeepAlive  json.RawMessage `json:"keep_alive,omitempty"`
	Truncate   *bool           `json:"truncate,omitempty"`
	Dimensions int             `json:"dimensions,omitempty"`
	Options    map[string]any  `json:"options"`
}

type embeddingRequest struct {
	Model     string          `json:"model"`
	Prompt    string          `json:"prompt"`
	KeepAlive json.RawMessage `json:"keep_alive,omitempty"`
	Options   map[string]any  `json:"options"`
}

type showRequest struct {
	Model    string         `json:"model"`
	System   string         `json:"system"`
	Template string         `json:"template"`
	Verbose  bool           `json:"verbose"`
	Options  map[string]any `json:"options"`
	Name     string         `json:"name"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type openaiMessage struct {
	Role       string          `json:"role"`
	Content    any             `json:"content"`
	Reasoning  string          `json:"reasoning,omitempty"`
	ToolCalls  json.RawMessage `json:"tool_calls,omitempty"`
	Name       string          `json:"name,omitempty"`
	ToolCallID string          `json:"tool_call_id,omitempty"`
}

type chatCompletionRequest struct {
	Model            string          `json:"model"`
	Messages         []openaiMessage `json:"messages"`
	Stream           bool            `json:"stream"`
	StreamOptions    *streamOptions  `json:"stream_options"`
	MaxTokens        *int            `json:"max_tokens"`
	Seed             *int            `json:"seed"`
	Stop             any             `json:"stop"`
	Temperature      *float64        `json:"temperature"`
	FrequencyPenalty *float64        `json:"frequency_penalty"`
	PresencePenalty  *float64        `json:"presence_penalty"`
	TopP             *float64        `json:"top_p"`
	ResponseFormat   json.RawMessage `json:"response_format"`
	Tools            json.RawMessage `json:"tools"`
	Reasoning        json.RawMessage `json:"reasoning,omitempty"`
	ReasoningEffort  *string         `json:"reasoning_effort,omitempty"`
	Logprobs         *bool           `json:"logprobs"`
	TopLogprobs      int             `json:"top_logprobs"`
}

type completionRequest struct {
	Model            string         `json:"model"`
	Prompt           string         `json:"prompt"`
	FrequencyPenalty float32        `json:"frequency_penalty"`
	MaxTokens        *int           `json:"max_tokens"`
	PresencePenalty  float32        `json:"presence_penalty"`
	Seed             *int           `json:"seed"`
	Stop             any            `json:"stop"`
	Stream           bool           `json:"stream"`
	StreamOptions    *streamOptions `json:"stream_options"`
	Temperature      *float32       `json:"temperature"`
	TopP             float32        `json:"top_p"`
	Suffix           string         `json:"suffix"`
	Logprobs         *int           `json:"logprobs"`
}

type openaiEmbedRequest struct {
	Input          any    `json:"input"`
	Model          string `json:"model"`
	Dimensions     int    `json:"dimensions,omitempty"`
	EncodingFormat string `json:"encoding_format,omitempty"`
}

type responsesRequest struct {
	Model           string          `json:"model"`
	Input           json.RawMessage `json:"input"`
	Instructions    string          `json:"instructions,omitempty"`
	MaxOutputTokens *int            `json:"max_output_tokens,omitempty"`
	Reasoning       json.RawMessage `json:"reasoning,omitempty"`
	Temperature     *float64        `json:"temperature"`
	Text            json.RawMessage `json:"text,omitempty"`
	TopP            *float64        `json:"top_p"`
	Tools           json.RawMessage `json:"tools,omitempty"`
	Stream          *bool           `json:"stream,omitempty"`
}

type messageParam struct {
	Role    string `json:"role"`
	Content any    `json:"content"`
}

type messagesRequest struct {
	Model         string          `json:"model"`
	MaxTokens     int             `json:"max_tokens"`
	Messages      []messageParam  `json:"messages"`
	System        any             `json:"system,omitempty"`
	Stream        bool            `json:"stream,omitempty"`
	Temperature   *float64        `json:"temperature,omitempty"`
	TopP          *float64        `json:"top_p,omitempty"`
	TopK          *int            `json:"top_k,omitempty"`
	StopSequences []string        `json:"stop_sequences,omitempty"`
	Tools         json.RawMessage `json:"tools,omitempty"`
	Thinking      json.RawMessage `json:"thinking,omitempty"`
	OutputConfig  json.RawMessage `json:"output_config,omitempty"`
}

type input struct {
	Route string `json:"route"`
	Body  string `json:"body"`
}

type view struct {
	Err       string   `json:"err,omitempty"`
	Model     string   `json:"model"`
	Stream    bool     `json:"stream"`
	Cap       *int64   `json:"cap"`
	KeepAlive bool     `json:"keep_alive"`
	Options   []string `json:"options"`
}

// numPredict is api.Options.FromMap for the one int option that caps the output.
func numPredict(options map[string]any) *int64 {
	value, ok := options["num_predict"]
	if !ok {
		return nil
	}
	var n int64
	switch t := value.(type) {
	case float64:
		n = int64(t)
	default:
		return nil
	}
	return &n
}

func optionNames(options map[string]any) []string {
	names := []string{}
	for name := range options {
		names = append(names, name)
	}
	return names
}

func intCap(p *int) *int64 {
	if p == nil {
		return nil
	}
	n := int64(*p)
	return &n
}

func defaultTrue(p *bool) bool {
	return p == nil || *p
}

func decode(in input) view {
	body := []byte(in.Body)
	var v view
	var err error
	switch in.Route {
	case "generate":
		var r generateRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, Stream: defaultTrue(r.Stream), Cap: numPredict(r.Options),
			KeepAlive: r.KeepAlive != nil, Options: optionNames(r.Options)}
	case "chat":
		var r chatRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, Stream: defaultTrue(r.Stream), Cap: numPredict(r.Options),
			KeepAlive: r.KeepAlive != nil, Options: optionNames(r.Options)}
	case "embed":
		var r embedRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, KeepAlive: r.KeepAlive != nil, Options: optionNames(r.Options)}
	case "embeddings":
		var r embeddingRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, KeepAlive: r.KeepAlive != nil, Options: optionNames(r.Options)}
	case "show":
		var r showRequest
		err = json.Unmarshal(body, &r)
		model := r.Model
		if model == "" {
			model = r.Name
		}
		v = view{Model: model, Options: optionNames(r.Options)}
	case "v1.chat":
		var r chatCompletionRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, Stream: r.Stream, Cap: intCap(r.MaxTokens)}
	case "v1.completions":
		var r completionRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, Stream: r.Stream, Cap: intCap(r.MaxTokens)}
	case "v1.embeddings":
		var r openaiEmbedRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model}
	case "v1.responses":
		var r responsesRequest
		err = json.Unmarshal(body, &r)
		v = view{Model: r.Model, Stream: r.Stream != nil && *r.Stream, Cap: intCap(r.MaxOutputTokens)}
	case "v1.messages":
		var r messagesRequest
		err = json.Unmarshal(body, &r)
		n := int64(r.MaxTokens)
		v = view{Model: r.Model, Stream: r.Stream, Cap: &n}
	default:
		return view{Err: "unknown route " + in.Route}
	}
	if err != nil {
		v.Err = err.Error()
	}
	if v.Options == nil {
		v.Options = []string{}
	}
	return v
}

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	encoder := json.NewEncoder(out)
	for scanner.Scan() {
		var in input
		if err := json.Unmarshal(scanner.Bytes(), &in); err != nil {
			encoder.Encode(view{Err: "bad input line: " + err.Error(), Options: []string{}})
		} else {
			encoder.Encode(decode(in))
		}
		out.Flush()
	}
}
