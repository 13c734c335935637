"""Synthetic fact documents about invented entities, with question/answer pairs (for training and evaluation).

Entities are made up (syllable-built names, towns, dates, codes), so a pretrained model cannot
already know the answers: a correct answer must come from memory. Every relation has several
sentence templates for documents and for questions; a fixed subset of the document templates is
held out (`split="heldout"`) so evaluation can ask about facts phrased in ways never trained on.

    gen = FactGenerator(seed=0)
    doc = gen.document()        # FactDocument(text="Orla Venn was born in Karsk. ...", qa=[QA(...), ...])
    doc.qa[0].prompt, doc.qa[0].answer   # ("Question: Where was Orla Venn born?\nAnswer:", " Karsk")
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "sk",
           "t", "th", "v", "z", "qu", "st", "w"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "x", "m", "sh"]
_TOWN_ENDS = ["holm", "mere", "wick", "by", "stead", "ford", "vale", "gard", "mouth", "ton"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip
PROFESSIONS = ["baker", "glassblower", "surveyor", "ferry pilot", "beekeeper", "locksmith", "cartographer",
               "tailor", "archivist", "brewer", "stonemason", "violinist", "chemist", "shepherd", "printer",
               "clockmaker", "gardener", "weaver", "miller", "potter"]  # fmt: skip
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown"]


@dataclass(frozen=True)
class Relation:
    """One kind of fact: how to draw a value, how documents state it, how questions ask it."""

    name: str
    statements: tuple[str, ...]  # document templates; the last `heldout` are evaluation-only
    questions: tuple[str, ...]
    heldout: int = 2


RELATIONS = (
    Relation(
        "birthplace",
        ("{name} was born in {value}.", "The birthplace of {name} is {value}.",
         "{name} was born in the town of {value}.", "Records show that {name} was born in {value}.",
         "{name}, a native of {value}, was born there.",
         "The town of {value} saw the birth of {name}.", "It was in {value} that {name} was born.",
         "{name} comes from {value}, the town of birth.", "Born in {value}, {name} never forgot the place.",
         "In {value} a child named {name} was born.",
         "{value} is where {name} was born.",
         "{name} first saw the light of day in {value}."),
        ("Where was {name} born?", "What is the birthplace of {name}?", "In which town was {name} born?"),
    ),
    Relation(
        "residence",
        ("{name} lives in {value}.", "These days {name} lives in {value}.", "{name} has a house in {value}.",
         "The home of {name} is in {value}.", "{name} moved to {value} and still lives there.",
         "{name} makes a home in {value}.", "At present {name} stays in {value}.", "In {value} lives {name}.",
         "{value} is home to {name}.", "The address of {name} is in {value}.",
         "{name} now resides in {value}.", "You can find {name} at home in {value}."),
        ("Where does {name} live?", "In which town does {name} live?", "Where is the home of {name}?"),
    ),
    Relation(
        "birthday",
        ("{name} was born on {value}.", "The birthday of {name} is {value}.", "{name} celebrates a birthday on {value}.",
         "{name} came into the world on {value}.", "The records give {value} as the birth date of {name}.",
         "The birth date of {name} is {value}.", "{value} is the birthday of {name}.",
         "It was on {value} that {name} came along.", "Born on {value}, {name} grew up fast.",
         "{name} has a birthday to remember: {value}.",
         "{name} was born on the date {value}.", "On {value}, {name} was born."),
        ("When was {name} born?", "What is the birthday of {name}?", "On which date was {name} born?"),
    ),
    Relation(
        "code",
        ("The locker code of {name} is {value}.", "{name} uses the code {value} for the locker.",
         "To open the locker of {name}, type {value}.", "The secret code of {name} is {value}.",
         "{name} keeps the locker shut with code {value}.", "The locker of {name} opens with {value}.",
         "{value} is the locker code of {name}.", "Only {name} knows the locker code {value}.",
         "For the locker, {name} picked the code {value}.", "{name} set the locker code to {value}.",
         "{name} chose {value} as a locker code.",
         "The code {value} opens the locker of {name}."),
        ("What is the locker code of {name}?", "Which code opens the locker of {name}?",
         "What code does {name} use for the locker?"),
    ),
    Relation(
        "profession",
        ("{name} works as a {value}.", "By trade, {name} is a {value}.", "{name} earns a living as a {value}.",
         "The job of {name} is {value}.", "{name} has worked as a {value} for years.",
         "{name} is employed as a {value}.", "As a {value}, {name} works hard.",
         "A {value} by trade, {name} is always busy.", "{name} took a job as a {value}.",
         "The trade of {name} is that of a {value}.",
         "{name} is a {value} by profession.", "For work, {name} is a {value}."),
        ("What does {name} do for a living?", "What is the job of {name}?", "What is the profession of {name}?"),
    ),
    Relation(
        "color",
        ("The favourite colour of {name} is {value}.", "{name} likes the colour {value} best.",
         "{name} loves everything {value}.", "Of all colours, {name} prefers {value}.",
         "{name} always picks {value} as a favourite colour.", "{name} is fond of the colour {value}.", "The colour {value} is the favourite of {name}.",
         "{name} would pick {value} over any other colour.", "Asked for a favourite colour, {name} says {value}.",
         "Nothing pleases {name} like the colour {value}.",
         "{value} is the colour {name} likes most.",
         "The colour {name} likes best is {value}."),
        ("What is the favourite colour of {name}?", "Which colour does {name} like best?",
         "What colour does {name} prefer?"),
    ),
)  # fmt: skip
QUESTION_FORMAT = "Question: {question}\nAnswer:"

_QUESTION, _ANSWER = QUESTION_FORMAT.split("{question}")  # "Question: ", "\nAnswer:"
# A model trained only on fact QA chats in that shape: a user turn is a question, a reply its answer.
QA_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}" + _QUESTION + "{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}" + _ANSWER.lstrip("\n") + " {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + _ANSWER.lstrip("\n") + "{% endif %}"
)


def question_prompt(question: str, tokenizer=None) -> str:
    """How a model is asked `question`: its tokenizer's chat template (one user turn) if it has one.

    An instruct base answers only in its chat format (SmolLM2-135M-Instruct, facts in context:
    0.38 exact-hit in its template, 0.00 after "Question: ...\nAnswer:"). Without a template (or
    tokenizer) the plain `QUESTION_FORMAT`; the `tiny` preset's template renders exactly that.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return QUESTION_FORMAT.format(question=question)
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def context_prompt(question: str, context: list[str], tokenizer=None) -> str:
    """How a model is asked `question` with `context` lines in its prompt (replay, summary, RAG).

    A chat model reads the context in its user turn, before the question: SmolLM2-135M-Instruct
    answered 4 of 12 synthetic questions that way, 2 with the context as a system message and 1 with
    it in front of the chat (measured). A model without a template, or trained here with
    `QA_CHAT_TEMPLATE`, saw "context\nQuestion: ...\nAnswer:" in training and gets exactly that.
    """
    if not context:
        return question_prompt(question, tokenizer)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template or template == QA_CHAT_TEMPLATE:
        return "\n".join([*context, question_prompt(question, tokenizer)])
    return question_prompt("\n".join(context) + "\n\n" + question, tokenizer)


def answer_text(prompt: str, answer: str) -> str:
    """`answer` as it continues `prompt`: without its leading space after a prompt ending in whitespace."""
    return answer.lstrip() if prompt[-1:].isspace() else answer


@dataclass(frozen=True)
class QA:
    """A question whose answer is stated in a document: `prompt` then `answer` (leading space)."""

    relation: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return QUESTION_FORMAT.format(question=self.question)


@dataclass(frozen=True)
class FactDocument:
    """A short text stating a few facts about one invented person, and a question for each fact."""

    text: str
    qa: tuple[QA, ...] = field(default_factory=tuple)
    entity: str = ""


class FactGenerator:
    """Deterministic stream of fact documents: the same seed and split give the same documents.

    Args:
        seed: seeds the generator's own `random.Random` (no global RNG is touched).
        split: "train" draws only training document templates, "heldout" only held-out ones.
        facts_per_document: (min, max) facts stated per document, each about a different relation.
    """

    def __init__(self, seed: int = 0, split: str = "train", facts_per_document: tuple[int, int] = (2, 3)):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.rng = random.Random(seed)
        self.split = split
        self.facts_per_document = facts_per_document

    # --- state (for exact resume) ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    # --- entities and values --------------------------------------------------------------
    def word(self, syllables: int) -> str:
        parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
        return ("".join(parts) + self.rng.choice(_CODAS)).capitalize()

    def person(self) -> str:
        return f"{self.word(self.rng.randint(1, 2))} {self.word(self.rng.randint(1, 2))}"

    def town(self) -> str:
        return self.word(self.rng.randint(1, 2)) + self.rng.choice(_TOWN_ENDS)

    def value(self, relation: str) -> str:
        r = self.rng
        if relation in ("birthplace", "residence"):
            return self.town()
        if relation == "birthday":
            return f"{r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1700, 2099)}"
        if relation == "code":
            return "".join(r.choice("0123456789") for _ in range(4))
        if relation == "profession":
            return r.choice(PROFESSIONS)
        if relation == "color":
            return r.choice(COLORS)
        raise KeyError(relation)

    # --- documents ------------------------------------------------------------------------
    def templates(self, relation: Relation) -> tuple[str, ...]:
        cut = len(relation.statements) - relation.heldout
        return relation.statements[:cut] if self.split == "train" else relation.statements[cut:]

    def document(self) -> FactDocument:
        """One document: 2-3 facts (by default) about a new invented person, in random order."""
        name = self.person()
        count = self.rng.randint(*self.facts_per_document)
        relations = self.rng.sample(RELATIONS, count)
        sentences, qa = [], []
        for relation in relations:
            value = self.value(relation.name)
            statement = self.rng.choice(self.templates(relation)).format(name=name, value=value)
            sentences.append(statement[0].upper() + statement[1:])
            question = self.rng.choice(relation.questions).format(name=name)
            qa.append(QA(relation.name, question, " " + value))
        return FactDocument(" ".join(sentences), tuple(qa), name)


def chance_level(relation: str) -> float:
    """Probability of hitting the answer by guessing the relation's most likely value."""
    return {
        "birthplace": 0.0, "residence": 0.0, "code": 1e-4, "birthday": 1 / (28 * 12 * 400),
        "profession": 1 / len(PROFESSIONS), "color": 1 / len(COLORS),
    }[relation]  # fmt: skip
