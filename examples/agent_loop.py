"""A small agent loop: the `openai` client, a `vishwamai-edge serve` on this machine, and two local Python
functions the model may call.

    vishwamai-edge serve BUNDLE            # in one terminal (http://127.0.0.1:8000)
    python examples/agent_loop.py "What is the weather in Oslo, and what is 12.5 times 3?"

Each round sends the conversation with the two functions; when the reply calls them, each call runs here
and its result goes back as a `tool` message, until the model answers in text. The first round requires
a call (a small model left to choose often answers from memory), later ones let the model choose, and the
last allows text only, so the loop always ends with an answer. Every call's arguments are valid under the
function's schema: the server enforces it while decoding.
"""

from __future__ import annotations

import argparse
import json
import sys

from openai import OpenAI

WEATHER = {"oslo": (4, "rain"), "paris": (17, "sun"), "rome": (22, "sun"), "tokyo": (12, "cloud")}


def get_weather(city: str) -> dict:
    """A stand-in for a sensor or a local service."""
    temperature, sky = WEATHER.get(city.strip().lower(), (15, "unknown"))
    return {"city": city, "temperature_c": temperature, "sky": sky}


def multiply(a: float, b: float) -> dict:
    return {"product": a * b}


FUNCTIONS = {"get_weather": get_weather, "multiply": multiply}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "multiply", "description": "Multiply two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]


def run(client: OpenAI, model: str, question: str, rounds: int = 3, seed: int = 0) -> str:
    messages: list[dict] = [{"role": "user", "content": question}]
    for turn in range(rounds + 1):
        choice = "required" if turn == 0 else "none" if turn == rounds else "auto"
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                               max_tokens=400, temperature=0.7, seed=seed)
        message = reply.choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = FUNCTIONS[call.function.name](**json.loads(call.function.arguments))
            print(f"  {call.function.name}({call.function.arguments}) -> {json.dumps(result)}", file=sys.stderr)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    raise AssertionError("unreachable: the last round allows text only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(run(client, model, args.question, seed=args.seed))


if __name__ == "__main__":
    main()
