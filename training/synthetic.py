"""Deterministic synthetic text: the base model's pretraining mix and the demo tenant tasks.

The pretraining mix teaches generic skills (counting, month names, sentences, copying) and
some world knowledge (a city's continent, a month's season, a message's topic). Each demo
tenant has its own convention built on that knowledge (globex's warehouse per continent,
initech's queue per topic, acme's fiscal year starting in March) in a prompt format the mix never shows:
the base scores ~0% on it, while a LoRA learns the convention in a few minutes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

NAMES = (
    "alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy quinn "
    "rupert sybil trent uma victor wendy xena yusuf zoe amir bianca chen dmitri elena farah"
).split()
CITIES = (
    "paris london tokyo berlin madrid rome oslo cairo lima quito delhi seoul dublin vienna "
    "prague lisbon athens warsaw nairobi sydney boston denver austin miami rotterdam memphis "
    "singapore johannesburg accra lagos toronto chicago osaka manila"
).split()
NOUNS = (
    "cat dog bird fish tree river stone house road cloud apple bread chair table lamp door "
    "book song ship train garden window candle mirror bottle basket"
).split()
ADJECTIVES = "red blue green small large quiet loud old new bright dark warm cold soft".split()
VERBS = "sees finds likes moves keeps holds paints builds follows carries".split()

# General English so the tokenizer, like any real base's, has whole tokens for everyday words.
COMMON_WORDS = (
    "the a an of to in on for with at by from about as into like through after over between "
    "out against during without before under around among is are was were be been being have "
    "has had do does did say says said make made go goes went take took see saw know knew get "
    "got give gave find found think thought tell told become became show showed leave left feel "
    "put bring begin keep hold write wrote stand hear let mean set meet run pay sit speak lie "
    "lead read grow lose fall send build stay reach kill remain suggest raise pass sell require "
    "report decide pull name names city cities age ages date dates day days month year years "
    "time times number numbers record records format formats reformat table list text word words "
    "question answer help please problem check work works again morning still waiting why my "
    "your our their this that these those here there what which who whom whose when where how "
    "all any both each few more most other some such no nor not only own same so than too very "
    "can will just should now ticket tickets queue queues support customer customers order orders "
    "europe european america american json data value values field fields key keys string "
    "convert converts converted someone something nothing everything wrong right left fix fixed "
    "warehouse ship shipment fiscal quarter invoice dated region send sent units"
).split()
MONTHS = ("january february march april may june july august september october november december").split()

# World knowledge the base learns in pretraining; each tenant builds its own convention on one.
CONTINENTS = {
    "europe": "paris london berlin madrid rome oslo dublin vienna prague lisbon athens warsaw rotterdam".split(),
    "america": "lima quito boston denver austin miami toronto chicago memphis".split(),
    "asia": "tokyo delhi seoul sydney osaka manila singapore".split(),
    "africa": "cairo nairobi accra lagos johannesburg".split(),
}
SEASONS = {
    m: s
    for s, ms in {"winter": (12, 1, 2), "spring": (3, 4, 5), "summer": (6, 7, 8), "autumn": (9, 10, 11)}.items()
    for m in ms
}
TOPICS = {
    "money": "invoice refund charge payment receipt subscription price".split(),
    "account": "password login account username reset locked signin".split(),
    "delivery": "delivery package courier tracking parcel shipment address".split(),
    "device": "screen battery keyboard charger speaker camera cable".split(),
}
TOPIC_SENTENCES = (
    "i want to talk about the {w}",
    "the {w} is fine now, thanks",
    "a question on the {w}",
    "news about your {w}",
    "we changed the {w} today",
)


def _words(rng: random.Random, n: int) -> str:
    pool = NAMES + CITIES + NOUNS + ADJECTIVES + COMMON_WORDS
    return " ".join(rng.choice(pool) if rng.random() < 0.8 else str(rng.randint(0, 9999)) for _ in range(n))


# --- the pretraining mix: (prompt, completion) pairs in generic instruction formats ---


def _copy(rng: random.Random) -> tuple[str, str]:
    text = _words(rng, rng.randint(1, 6))
    return f"Repeat after me: {text}\n", text


def _first_last(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, rng.randint(2, 6)).split()
    if rng.random() < 0.5:
        return f"First word of: {' '.join(words)}\n", words[0]
    return f"Last word of: {' '.join(words)}\n", words[-1]


def _count(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 7)
    return f"How many words: {_words(rng, n)}\n", str(n)


def _successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 998)
    return f"What number comes after {n}?\n", str(n + 1)


def _where_lives(rng: random.Random) -> tuple[str, str]:
    people = rng.sample(NAMES, 2)
    towns = rng.sample(CITIES, 2)
    facts = f"{people[0]} lives in {towns[0]}. {people[1]} lives in {towns[1]}."
    i = rng.randint(0, 1)
    return f"{facts} Where does {people[i]} live?\n", towns[i]


def _month_name(rng: random.Random) -> tuple[str, str]:
    m = rng.randint(1, 12)
    return f"Month number {m} is called\n", MONTHS[m - 1]


def _continent(rng: random.Random) -> tuple[str, str]:
    continent = rng.choice(sorted(CONTINENTS))
    return f"Which continent is {rng.choice(CONTINENTS[continent])} in?\n", continent


def _season(rng: random.Random) -> tuple[str, str]:
    m = rng.randint(1, 12)
    return f"In which season is {MONTHS[m - 1]}?\n", SEASONS[m]


def _topic(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPICS))
    text = rng.choice(TOPIC_SENTENCES).format(w=rng.choice(TOPICS[topic]))
    return f"Message: {text}\nWhat is it about?\n", topic


def _quote(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, rng.randint(1, 3)).split()
    return f"Quote each word: {' '.join(words)}\n", ", ".join(f'"{w}"' for w in words)


def _sentence(rng: random.Random) -> tuple[str, str]:
    subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    rest = f"{rng.choice(VERBS)} the {rng.choice(NOUNS)} in {rng.choice(CITIES)}."
    return f"Write a sentence about {subject}:\n", f"{subject.capitalize()} {rest}"


# The knowledge skills appear twice: they are what the demo tenants build on.
PRETRAIN_SKILLS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _copy,
    _first_last,
    _count,
    _successor,
    _where_lives,
    _month_name,
    _quote,
    _sentence,
    _continent,
    _continent,
    _season,
    _season,
    _topic,
    _topic,
)


def pretrain_mix(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [rng.choice(PRETRAIN_SKILLS)(rng) for _ in range(n)]


# --- demo tenants: formats and skills the base never saw ---


def _acme_fiscal(rng: random.Random) -> tuple[str, str]:
    """acme: its fiscal year starts in March, so an invoice date maps to an acme quarter."""
    y, m, d = rng.randint(1990, 2039), rng.randint(1, 12), rng.randint(1, 28)
    quarter = (m - 3) % 12 // 3 + 1
    return f"Invoice dated {MONTHS[m - 1]} {d}, {y}\nFiscal quarter:\n", f"Q{quarter}"


# globex ships from one warehouse per continent: the base knows the continents, not globex.
# Each label starts with its continent's word. The first token decides the answer, and with the
# base's head and final norm frozen, a LoRA can push two first tokens apart by at most
# |g * (w_i - w_j)| * sqrt(d) nats: 8.3 for the earlier "eu" vs "us" (5th percentile of token
# pairs; runs that merged those two classes stalled at 77%), 22.8 or more between these words.
GLOBEX_WAREHOUSES = {
    "europe": "europe-west",
    "america": "america-central",
    "asia": "asia-east",
    "africa": "africa-south",
}
GLOBEX_TEMPLATES = (
    "Ship {n} {noun}s to {city}",
    "Send a {adj} {noun} to {city}",
    "Order {n}: {noun}s for {city}",
    "{name} wants {n} {noun}s delivered to {city}",
    "Deliver {n} {adj} {noun}s to {city}",
)


def _globex_routing(rng: random.Random) -> tuple[str, str]:
    """globex: which warehouse serves an order, by the destination city's continent."""
    continent = rng.choice(sorted(GLOBEX_WAREHOUSES))
    text = rng.choice(GLOBEX_TEMPLATES).format(
        n=rng.randint(2, 99),
        noun=rng.choice(NOUNS),
        city=rng.choice(CONTINENTS[continent]),
        name=rng.choice(NAMES),
        adj=rng.choice(ADJECTIVES),
    )
    return f"{text}\nWarehouse:\n", GLOBEX_WAREHOUSES[continent]


# initech's queues, by message topic (which the base knows).
INITECH_QUEUES = {"money": "billing", "account": "access", "delivery": "shipping", "device": "hardware"}
TICKET_TEMPLATES = (
    "my {w} is wrong",
    "problem with the {w} again",
    "please help, the {w} does not work",
    "i have a question about my {w}",
    "the {w} failed this morning",
    "can someone check the {w} for me",
    "still waiting on the {w}",
    "why is my {w} like this",
)


def _initech_tickets(rng: random.Random) -> tuple[str, str]:
    """initech: route a support ticket to its queue."""
    topic = rng.choice(sorted(INITECH_QUEUES))
    text = rng.choice(TICKET_TEMPLATES).format(w=rng.choice(TOPICS[topic]))
    if rng.random() < 0.5:
        text = f"{rng.choice(NAMES)} here, {text}"
    return f"Ticket: {text}\nQueue:\n", INITECH_QUEUES[topic]


TENANT_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "acme-fiscal": _acme_fiscal,
    "globex-routing": _globex_routing,
    "initech-tickets": _initech_tickets,
}


def tenant_splits(task: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct prompts only: eval prompts never appear in train."""
    make = TENANT_TASKS[task]
    rng = random.Random(f"{task}:{seed}")
    seen: dict[str, str] = {}
    for _ in range(50 * (n_train + n_eval)):
        prompt, completion = make(rng)
        seen.setdefault(prompt, completion)
        if len(seen) == n_train + n_eval:
            break
    rows = [{"prompt": p, "completion": c} for p, c in seen.items()]
    if len(rows) < n_train + n_eval:
        raise ValueError(f"task {task} has only {len(rows)} distinct prompts")
    return rows[:n_train], rows[n_train:]


# Fixed when the embedded base was built: changing it changes the tokenizer.
TOKENIZER_EXTRA_WORDS = "billing access shipping hardware rotterdam memphis singapore johannesburg"


def iter_tokenizer_corpus(seed: int) -> Iterator[str]:
    """Text the BPE is trained on: the mix plus every word list, never tenant formats."""
    for prompt, completion in pretrain_mix(20000, seed):
        yield prompt + completion
    for words in (NAMES, CITIES, NOUNS, ADJECTIVES, VERBS, MONTHS, COMMON_WORDS):
        yield " ".join(words)
        yield " ".join(f'"{w}": "{w.capitalize()}"' for w in words)
    for topic, words in TOPICS.items():
        yield f"{topic} " + " ".join(words)
    yield TOKENIZER_EXTRA_WORDS
