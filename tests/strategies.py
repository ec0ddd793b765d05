"""Hypothesis strategies for hostile input, shared by the unit fuzz tests and the live-server ones."""

from __future__ import annotations

from hypothesis import strategies as st

from loraplex.training.adapter_id import MAX_ID_LENGTH

# text that tends to break parsers: separators, traversal, control and bidi characters, surrogates
hostile_text = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(list("./\\~%:$\x00\n\r\t\x7f\u202e\u200b ") + list("az09-_")), max_size=40),
    st.sampled_from(
        [
            "..",
            "../x",
            "/etc/passwd",
            "a/../../b",
            "C:\\x",
            "x\x00y",
            "\ud800",
            "%2e%2e",
            "~root",
            ".hidden",
            "-rf",
            "a" * (MAX_ID_LENGTH + 1),
            "CON",
            "double",
            "__class__",
        ]
    ),
)
proto_text = hostile_text.filter(lambda t: not any("\ud800" <= c <= "\udfff" for c in t))  # UTF-8 on the wire
finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**20), 10**20))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)


def proto_requests():
    from loraplex.v1 import loraplex_pb2 as pb

    int32 = st.integers(-(2**31), 2**31 - 1)
    message = st.builds(pb.ChatMessage, role=proto_text, content=proto_text)
    return st.builds(
        pb.GenerateRequest,
        prompt=proto_text,
        max_tokens=int32,
        temperature=st.floats(width=32),
        top_p=st.floats(width=32),
        top_k=int32,
        seed=st.integers(-(2**63), 2**63 - 1),
        stop=st.lists(proto_text, max_size=10),
        messages=st.lists(message, max_size=3),
        request_id=proto_text,
        ignore_eos=st.booleans(),
        n=int32,
        echo=st.booleans(),
        logprobs=int32,
        response_format=proto_text,
        presence_penalty=st.floats(width=32),
        frequency_penalty=st.floats(width=32),
        repetition_penalty=st.floats(width=32),
        logit_bias=st.dictionaries(int32, st.floats(width=32), max_size=3),
        min_tokens=int32,
        stop_token_ids=st.lists(int32, max_size=3),
    )


def mutated_bodies(base: dict):
    """Valid bodies with fields replaced by arbitrary JSON, dropped, or added."""
    return st.builds(
        lambda changes, dropped: {**{k: v for k, v in base.items() if k not in dropped}, **changes},
        st.dictionaries(
            st.sampled_from(
                [
                    *base,
                    "stream",
                    "n",
                    "seed",
                    "top_k",
                    "top_p",
                    "stop",
                    "temperature",
                    "max_completion_tokens",
                    "ignore_eos",
                    "extra",
                    # the OpenAI fields of #15
                    "logprobs",
                    "top_logprobs",
                    "echo",
                    "stream_options",
                    "response_format",
                    "presence_penalty",
                    "frequency_penalty",
                    "repetition_penalty",
                    "logit_bias",
                    "min_tokens",
                    "stop_token_ids",
                    "user",
                ]
            ),
            json_values,
            max_size=4,
        ),
        st.sets(st.sampled_from(list(base)), max_size=2),
    )
