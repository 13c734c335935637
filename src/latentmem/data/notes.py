"""Everyday facts as users write them: notes, chat messages, reminders, with questions about them.

`FactGenerator` (synthetic.py) states six encyclopaedic relations about invented people. Real memory
content looks different: "btw the wifi at the cabin is called BlueHeron, don't forget." This module
draws 35 such relations (where a key is kept, a pet's name, a flight gate, a door code, a friend's
job, ...) in first person, about named people, in chat style and note style. Values are invented or
combinatorial (colour x container, invented towns and surnames, random codes), so a pretrained model
cannot guess them; each answer is a short span that appears verbatim in the text.

    gen = NoteGenerator(seed=0)
    doc = gen.document()   # text="have to go to the Weinoal Trust branch in Zirwick on Friday. My puppy is ..."
    doc.qa[0].question, doc.qa[0].answer   # ("Which town's Weinoal Trust branch do I use?", " Zirwick")
    doc.entity             # "Weinoal Trust branch; my puppy": what each fact is about

A relation is data: the kind of value it asks for, statement and question templates, and a subject
(what the fact is about). Every other `{slot}` in a template names a kind too (`{first}`, `{town}`,
`{weekday}`; a trailing digit allows two of one kind), drawn once per fact so the statement and the
question agree. As in synthetic.py, the last `heldout` statements of each relation are evaluation-only.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from .synthetic import COLORS, QA, FactDocument

# --- word pools -----------------------------------------------------------------------------------
FIRST_NAMES = """
    Aaliyah Abel Ada Adrian Agnes Aiko Alba Alec Alma Amara Amir Anika Anton Ariel Arjun Astrid Aurelio Ayla
    Beatrix Bela Benedikt Bianca Bram Bruno Calla Callum Camille Carmen Cass Cedric Celeste Chiara Cillian
    Clara Colm Cosima Dalia Damon Dana Dara Dario Delphine Dev Dinah Dmitri Edda Edgar Eila Elias Elif
    Elodie Emeka Enzo Esme Esther Ezra Fabian Farah Felix Fenna Finn Flora Frida Gaspard Gemma Gideon Greta
    Gus Hana Hannes Hattie Hector Hedda Hugo Ida Idris Ilse Imani Ines Ingrid Iris Isak Ivo Jada Jago Janne
    Jasper Jonas Josefin Jude Juno Kaia Kasimir Keira Kenji Kiran Klara Kofi Lale Lars Leila Lena Leon Lila
    Linus Livia Lorcan Luca Lumi Mabel Magnus Maia Malik Mara Marek Matilde Mei Milo Mira Nadia Nico Nils
    Noor Nora Odile Olek Olivia Omar Orla Oskar Otto Paloma Pax Petra Pilar Quentin Quinn Rafael Rania Remy
    Rhea Rina Rohan Rosa Rufus Sabine Saoirse Selma Senna Silas Sofia Soren Stellan Suki Sven Talia Tamsin
    Teo Thea Tobias Tova Ulla Una Valentin Vera Vida Viggo Wanda Wren Xavi Yara Yusuf Zadie Zara Zeno Zofia
    Anouk Basil Bettina Cyrus Dorit Emil Fern Ginny Hal Ilka Jorah Kasia Lotte Mateo Nell Oona Perrin Raul
    Sigrid Tariq Ugo Vesna Wilma Yannick Zuri""".split()  # noqa: SIM905 (a word list reads best as text)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")  # fmt: skip
CONTAINERS = ("teapot", "biscuit tin", "flower pot", "shoebox", "sugar jar", "watering can", "boot", "vase",
              "tea caddy", "sewing box", "cookie jar", "toolbox", "fruit bowl", "lunchbox", "candle jar",
              "umbrella stand", "recipe box", "coffee tin", "gnome", "birdhouse")  # fmt: skip
FURNITURE_WOODS = ("oak", "walnut", "pine", "white", "grey", "cherry", "bamboo", "metal", "wicker", "teak",
                   "painted", "birch")  # fmt: skip
FURNITURE = ("dresser", "desk", "cabinet", "sideboard", "bookcase", "wardrobe", "chest", "nightstand",
             "filing cabinet", "trunk", "bureau", "console table")  # fmt: skip
# Consonant-initial on purpose: templates say "a {value}".
PROFESSIONS = ("nurse", "baker", "plumber", "dentist", "pilot", "librarian", "carpenter", "pharmacist",
               "firefighter", "paramedic", "tailor", "vet", "chef", "surveyor", "locksmith", "florist",
               "midwife", "translator", "journalist", "potter", "brewer", "barista", "sculptor", "welder",
               "geologist", "beekeeper", "jeweller", "lawyer", "physiotherapist", "park ranger", "cartographer",
               "radiographer", "tattoo artist", "sound engineer", "bus driver", "tram driver", "ferry captain",
               "pastry chef", "zookeeper", "violin teacher", "maths teacher", "landscape gardener",
               "wedding photographer", "software tester", "court reporter", "dog groomer", "roofer",
               "glassblower")  # fmt: skip
DEPARTMENTS = ("payroll", "logistics", "marketing", "security", "procurement", "facilities", "data", "design",
               "research", "quality", "support", "legal", "recruiting", "training", "compliance", "billing")  # fmt: skip
TITLES = ("manager", "lead", "analyst", "coordinator", "director", "officer", "specialist", "assistant")
ANIMALS = ("Heron", "Otter", "Falcon", "Badger", "Lynx", "Marten", "Walrus", "Gecko", "Puffin", "Bison",
           "Koala", "Magpie", "Osprey", "Panda", "Raven", "Salmon", "Tapir", "Wombat", "Yak", "Zebra",
           "Beaver", "Coyote", "Dingo", "Egret", "Ferret", "Gibbon", "Ibis", "Jackal", "Kestrel", "Lemur")  # fmt: skip
ADJECTIVES = ("Copper", "Velvet", "Paper", "Midnight", "Hollow", "Silver", "Lonely", "Electric", "Quiet",
              "Wooden", "Crooked", "Northern", "Gentle", "Restless", "Golden", "Rusty", "Salt", "Neon",
              "Broken", "Amber")  # fmt: skip
PLURALS = ("Foxes", "Lanterns", "Harbours", "Orchids", "Engines", "Sparrows", "Tides", "Ghosts", "Pilots",
           "Comets", "Kettles", "Ravens", "Tigers", "Anchors", "Bicycles", "Glaciers", "Owls", "Mirrors",
           "Cathedrals", "Pebbles")  # fmt: skip
NOUNS = ("lantern", "harbour", "orchid", "engine", "sparrow", "kettle", "anchor", "glacier", "mirror", "pebble",
         "compass", "thistle", "marble", "ribbon", "saddle", "walnut", "tulip", "cobalt", "meadow", "pepper",
         "violin", "teacup", "falcon", "cactus", "pillow", "rocket", "basket", "ladder", "candle", "button",
         "jigsaw", "acorn", "banjo", "canyon", "dolphin", "ember", "fossil", "garnet", "hammock", "igloo")  # fmt: skip
FOODS = ("fennel", "mango", "lentil", "pumpkin", "leek", "chickpea", "mushroom", "spinach", "beetroot",
         "aubergine", "lemon", "walnut", "cherry", "halloumi", "salmon", "prawn", "chorizo", "coconut",
         "sweet potato", "artichoke", "ginger", "apricot", "plum", "asparagus", "celeriac")  # fmt: skip
DISHES = ("risotto", "curry", "soup", "pie", "tart", "dumplings", "stew", "pasta", "salad", "tacos", "pancakes",
          "noodles", "lasagne", "flatbread", "gnocchi", "casserole")  # fmt: skip
ALLERGENS = ("peanuts", "shellfish", "sesame", "kiwi", "penicillin", "bee stings", "latex", "cats", "dust mites",
             "strawberries", "hazelnuts", "celery", "mustard", "lupin", "soy", "eggs", "walnuts", "almonds",
             "pollen", "ibuprofen", "aspirin", "mango", "tomatoes", "garlic", "oats", "buckwheat", "cashews",
             "pistachios", "coconut", "sulphites", "horse hair", "wool", "nickel", "chamomile")  # fmt: skip
PREPS = ("toasted", "smoked", "grated", "crushed", "dried", "pickled", "roasted", "candied", "ground", "fresh")
SPICES = ("fennel seeds", "ginger", "lime zest", "cardamom", "walnuts", "chilli", "rosemary", "orange peel",
          "black pepper", "garlic", "cumin", "coriander seeds", "nutmeg", "sage", "hazelnuts", "anise", "dill",
          "mustard seeds", "lemongrass", "pistachios")  # fmt: skip
MATERIALS = ("copper", "leather", "ceramic", "wooden", "linen", "glass", "brass", "wool", "bamboo", "cork",
             "marble", "velvet", "silk", "pewter", "felt", "canvas", "walnut", "porcelain")  # fmt: skip
GIFTS = ("watering can", "teapot", "notebook", "lamp", "chess set", "bread board", "scarf", "wallet", "plant pot",
         "desk clock", "picture frame", "pen case", "jewellery box", "candle holder", "bookend",
         "backgammon set", "serving tray", "bird feeder", "tea set", "tote bag")  # fmt: skip
PARTS_OF_DAY = ("morning", "afternoon", "evening", "night", "lunchtime")
VEHICLES = ("hatchback", "van", "estate", "pickup", "camper", "convertible", "saloon", "scooter", "minivan", "jeep")

# Slot kinds used only to make questions specific (not answers): small lists are fine here.
_SLOT_POOLS = {
    "key_item": ("house key", "car key", "shed key", "garage key", "bike lock key", "mailbox key", "office key",
                 "back door key", "cabin key", "basement key"),
    "document": ("passport", "birth certificate", "car insurance papers", "spare glasses", "warranty booklet",
                 "tax folder", "vaccination card", "watch box", "cheque book", "lease contract", "photo USB stick"),
    "pet": ("cat", "dog", "rabbit", "tortoise", "parrot", "hamster", "goldfish", "ferret", "guinea pig",
            "lizard", "budgie", "kitten", "puppy"),
    # Gender-neutral, since first names are drawn independently of them.
    "relative": ("cousin", "friend", "colleague", "flatmate", "partner", "best friend", "old classmate",
                 "teammate", "landlord", "godparent", "sibling", "in-law"),
    "child": ("kid", "youngest", "eldest", "godchild", "grandchild", "stepchild"),
    "appointment": ("dentist", "physio", "eye test", "haircut", "vet", "GP", "dermatology", "blood test",
                    "hearing test", "massage", "orthodontist", "tax advisor"),
    "doctor": ("GP", "dentist", "dermatologist", "paediatrician", "physiotherapist", "eye doctor",
               "cardiologist", "allergist"),
    "venue": ("gym", "pool", "office", "school", "station", "climbing hall", "library", "ski lodge",
              "yoga studio", "sauna"),
    "door": ("the bike shed", "the office side entrance", "the rehearsal room", "the storage unit",
             "the garden gate", "the holiday flat", "the back stairwell", "the server room",
             "the community hall", "the boat house"),
    "wifi_place": ("the cabin", "my parents' house", "the office", "the studio", "the beach house", "grandma's",
                   "the new flat", "the coworking space", "the shop", "the lake house"),
    "account": ("email", "bank", "laptop", "router", "streaming", "tax portal", "work VPN", "phone backup",
                "photo cloud"),
    "plant": ("fern", "basil", "monstera", "cactus", "orchid", "lemon tree", "bonsai", "peace lily", "aloe",
              "spider plant", "rubber plant", "tomato plants"),
    "parking_place": ("the airport", "the hospital", "the mall", "the stadium", "the station",
                      "the office garage", "the ferry terminal", "the arena", "the conference centre",
                      "the ski resort"),
    "recipe": ("chili", "banana bread", "lasagne", "apple pie", "tomato sauce", "curry", "pancakes", "stew",
               "brownies", "soup", "meatballs", "dumplings"),
    "activity": ("spin", "yoga", "pilates", "boxing", "climbing", "swimming", "rowing", "zumba", "circuit",
                 "kickboxing", "tai chi", "barre"),
    "team": ("weekly planning", "budget review", "design sync", "standup", "sales catch-up", "retro",
             "board update", "hiring panel", "product demo", "team lunch"),
    "condition": ("migraines", "hay fever", "blood pressure", "back pain", "eczema", "acid reflux", "asthma",
                  "joint pain", "insomnia", "sinus trouble"),
    "weekday": WEEKDAYS,
}  # fmt: skip

FILLER = (
    "Need to buy milk later.", "The weather has been grey all week.", "Call back about the boiler.",
    "Also, the library books are due soon.", "Remember to charge the laptop.", "The bins go out tonight.",
    "Long day, but a good one.", "Still have to reply to those emails.", "The kettle is making that noise again.",
    "Might go for a walk after lunch.", "Running low on coffee.", "Anyway, more later.", "The train was late again.",
    "Oh, and the printer is jammed again.", "Have to renew the bus pass.", "It rained all morning.",
    "Tidy the desk this weekend.", "Water bill arrived, nothing unusual.", "The new curtains look great.",
    "Need to return the drill.", "Finished the crossword, finally.", "So much laundry to do.",
)  # fmt: skip

# Invented words: own syllable tables (softer than synthetic.py's), so names differ in flavour.
_ONSETS = ("b", "br", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "sh", "tr", "kl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "oa", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "nd", "rt", "m", "x")
_TOWN_ENDS = ("by", "holm", "wick", "ton", "ford", "mere", "stead", "dale", "haven", "moor")


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _choice(pool: tuple[str, ...]):
    return lambda rng: rng.choice(pool)


def _clock(rng: random.Random) -> str:
    return f"{rng.randint(1, 12)}:{rng.randrange(0, 60, 5):02d}{rng.choice(('am', 'pm'))}"


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))


def _shoe_size(rng: random.Random) -> str:
    size = rng.randrange(56, 96) / 2  # EU 28 to 47.5 in half sizes
    return f"{size:g}"


# Every slot or value kind: how to draw it. Answers use the combinatorial or invented ones.
KINDS = {
    **{kind: _choice(pool) for kind, pool in _SLOT_POOLS.items()},
    "first": lambda r: r.choice(FIRST_NAMES),
    "surname": lambda r: _word(r, r.randint(2, 3)),
    "full_name": lambda r: f"{r.choice(FIRST_NAMES)} {_word(r, r.randint(2, 3))}",
    "town": lambda r: _word(r, r.randint(1, 2)) + r.choice(_TOWN_ENDS),
    "pet_name": lambda r: _word(r, r.randint(1, 2)),
    "codename": lambda r: _word(r, 2),
    "room_name": lambda r: _word(r, 2),
    "medicine": lambda r: _word(r, 2) + r.choice(("ol", "ex", "ine", "afen", "ium", "ocin", "azol", "ipra")),
    "bank": lambda r: f"{_word(r, 2)} {r.choice(('Savings', 'Mutual', 'Bank', 'Credit Union', 'Trust'))}",
    "hotel": lambda r: f"{_word(r, 2)} {r.choice(('Hotel', 'Inn', 'Lodge', 'Guesthouse'))}",
    "shop": lambda r: _word(r, 2),
    "school": lambda r: f"{_word(r, 2)} {r.choice(('Primary', 'Academy', 'Elementary', 'High School'))}",
    "spot": lambda r: f"{r.choice(COLORS)} {r.choice(CONTAINERS)}",
    "furniture": lambda r: f"{r.choice(FURNITURE_WOODS)} {r.choice(FURNITURE)}",
    "profession": lambda r: r.choice(PROFESSIONS),
    "role": lambda r: f"{r.choice(DEPARTMENTS)} {r.choice(TITLES)}",
    "clock": _clock,
    "gate": lambda r: f"{_letters(r, 1)}{r.randint(1, 60)}",
    "seat": lambda r: f"{r.randint(1, 45)}{r.choice('ABCDEF')}",
    "code4": lambda r: _digits(r, 4),
    "code6": lambda r: _digits(r, 6),
    "wifi": lambda r: f"{r.choice(ADJECTIVES)}{r.choice(ANIMALS)}{r.choice(('', '', _digits(r, 2)))}",
    "hint": lambda r: f"{r.choice(NOUNS)}{_digits(r, 2)}",
    "dish": lambda r: f"{r.choice(FOODS)} {r.choice(DISHES)}",
    "book": lambda r: f"The {r.choice(NOUNS).capitalize()} of {_word(r, r.randint(1, 2))}",
    "band": lambda r: f"The {r.choice(ADJECTIVES)} {r.choice(PLURALS)}",
    "allergen": lambda r: r.choice(ALLERGENS),
    "plate": lambda r: f"{_letters(r, 2)}{_digits(r, 2)} {_letters(r, 3)}",
    "car": lambda r: f"{r.choice(COLORS)} {r.choice(VEHICLES)}",
    "watering": lambda r: f"{r.choice(WEEKDAYS)} {r.choice(PARTS_OF_DAY)}",
    "date": lambda r: f"{r.randint(1, 28)} {r.choice(MONTHS)}",
    "parking": lambda r: f"{_letters(r, 1)}-{r.randint(1, 150)}",
    "ingredient": lambda r: f"{r.choice(PREPS)} {r.choice(SPICES)}",
    "gift": lambda r: f"{r.choice(MATERIALS)} {r.choice(GIFTS)}",
    "shoe_size": _shoe_size,
    "house": lambda r: str(r.randint(1, 199)),
    "tracking": lambda r: f"{r.choice(NOUNS)}-{r.choice(NOUNS)}",
    "room_number": lambda r: f"{r.randint(1, 9)}{r.randint(0, 3)}{r.randint(1, 9)}",
}  # fmt: skip

# Probability of guessing a value kind's most likely value (0 for invented words).
_CHANCE = {
    "profession": 1 / len(PROFESSIONS), "allergen": 1 / len(ALLERGENS), "watering": 1 / (7 * len(PARTS_OF_DAY)),
    "shoe_size": 1 / 40, "role": 1 / (len(DEPARTMENTS) * len(TITLES)), "spot": 1 / (len(COLORS) * len(CONTAINERS)),
    "furniture": 1 / (len(FURNITURE_WOODS) * len(FURNITURE)), "clock": 1 / 288, "gate": 1 / (26 * 60),
    "seat": 1 / 270, "code4": 1e-4, "code6": 1e-6, "dish": 1 / (len(FOODS) * len(DISHES)), "date": 1 / 336,
    "band": 1 / (len(ADJECTIVES) * len(PLURALS)), "ingredient": 1 / (len(PREPS) * len(SPICES)),
    "gift": 1 / (len(MATERIALS) * len(GIFTS)), "wifi": 1 / (len(ADJECTIVES) * len(ANIMALS) * 3),
    "hint": 1 / (len(NOUNS) * 100), "parking": 1 / (26 * 150), "tracking": 1 / len(NOUNS) ** 2,
    "room_number": 1 / 324, "plate": 1 / (26**5 * 100),
}  # fmt: skip


@dataclass(frozen=True)
class NoteRelation:
    """One kind of everyday fact: the kind of its value, how notes state it, how a user asks about it.

    `subject` names what the fact is about (it becomes the document's `entity`). Templates may use
    `{value}` and any slot kind of `KINDS` by name.
    """

    name: str
    value: str  # a key of KINDS
    subject: str
    statements: tuple[str, ...]  # the last `heldout` are evaluation-only
    questions: tuple[str, ...]
    heldout: int = 2


NOTE_RELATIONS = (
    NoteRelation("key_location", "spot", "spare {key_item}", (
        "I keep my spare {key_item} inside the {value}.", "Note to self: spare {key_item} is in the {value}.",
        "btw the spare {key_item} is hidden in the {value}, don't forget.", "Spare {key_item}: {value}.",
        "If you ever need my spare {key_item}, look in the {value}.", "Hid the spare {key_item} in the {value} again.",
        "The {value} is where my spare {key_item} lives now.", "ok so the spare {key_item}? it's tucked in the {value}."),
        ("Where do I keep my spare {key_item}?", "Where is my spare {key_item} hidden?",
         "Where did I put the spare {key_item}?")),
    NoteRelation("object_location", "furniture", "{document}", (
        "My {document} is in the bottom drawer of the {value}.", "Put the {document} in the {value} in the hallway.",
        "Reminder: the {document} is in the top drawer of the {value}.", "fyi I moved my {document} to the {value}.",
        "The {document} lives in the {value} now, left side.", "Filed the {document} away in the {value}.",
        "Where's my {document}? In the {value}, under the blankets.",
        "Found a new home for the {document}: the {value} in the spare room."),
        ("Where is my {document}?", "Where did I put my {document}?", "Which piece of furniture holds my {document}?")),
    NoteRelation("pet_name", "pet_name", "my {pet}", (
        "My {pet} is called {value}.", "Our new {pet}, {value}, finally settled in.",
        "lol {value} (my {pet}) knocked everything off the desk again.", "{value} the {pet} needs a vet check soon.",
        "We named the {pet} {value}.", "Feed {value}, the {pet}, twice a day.",
        "Say hi to {value}, my {pet}!", "The {pet}'s name is {value}, after a song I like."),
        ("What is my {pet} called?", "What's the name of my {pet}?", "What did we name the {pet}?")),
    NoteRelation("person_job", "profession", "{relative} {first}", (
        "My {relative} {first} works as a {value}.", "{first}, my {relative}, is a {value}.",
        "my {relative} {first} just started as a {value}, so proud!", "{first} ({relative}) has been a {value} for years.",
        "Note: {relative} {first} is a {value}, ask about work.", "{first}, my {relative}, earns a living as a {value}.",
        "Did I mention my {relative} {first} is a {value} now?", "The {value} in the family is my {relative} {first}."),
        ("What does my {relative} {first} do for work?", "What is {first}'s job?", "What does {first} work as?")),
    NoteRelation("person_city", "town", "{relative} {first}", (
        "My {relative} {first} lives in {value}.", "{first} (my {relative}) moved to {value} last spring.",
        "my {relative} {first} is in {value} these days, visit soon.", "Note: {relative} {first}, based in {value}.",
        "{first}, my {relative}, has a flat in {value}.", "Sent a card to my {relative} {first} in {value}.",
        "These days {first}, my {relative}, calls {value} home.",
        "If I'm ever near {value}, I should see my {relative} {first}."),
        ("Where does my {relative} {first} live?", "Which town does {first} live in?", "Where is {first} based?")),
    NoteRelation("colleague_role", "role", "{first} {surname}", (
        "{first} {surname} from work is the new {value}.", "At the office, {first} {surname} is our {value}.",
        "fyi {first} {surname} took over as {value} this week.", "Met {first} {surname} today, the {value}.",
        "Contact: {first} {surname}, {value}.", "Remember that {first} {surname} is the {value} now.",
        "Who's the {value}? {first} {surname}, as of Monday.", "{first} {surname} got promoted to {value}."),
        ("What is {first} {surname}'s role at work?", "What does {first} {surname} do at the office?",
         "What is {first} {surname}'s job title?")),
    NoteRelation("appointment_time", "clock", "{appointment} appointment", (
        "Reminder: {appointment} {weekday} {value}.", "My {appointment} appointment is on {weekday} at {value}.",
        "btw {appointment} moved to {weekday}, {value}, don't be late.", "Booked the {appointment} for {value} on {weekday}.",
        "{weekday}: {appointment} at {value}, bring the card.",
        "Don't forget the {appointment} appointment at {value} this {weekday}.",
        "Got a slot for the {appointment}, {weekday} at {value}!", "The {appointment} people confirmed {value} on {weekday}."),
        ("What time is my {appointment} appointment?", "When on {weekday} is my {appointment}?",
         "At what time do I have the {appointment}?")),
    NoteRelation("doctor_name", "surname", "my {doctor}", (
        "My {doctor} is Dr. {value}.", "Note: my {doctor} is Dr. {value} at the clinic on the corner.",
        "switched {doctor}s, it's Dr. {value} now.", "Dr. {value} is the {doctor} I see.",
        "Ask for Dr. {value} when calling the {doctor}'s office.", "The new {doctor}, Dr. {value}, was really kind.",
        "Appointments with my {doctor} go through Dr. {value}'s assistant.", "Who's my {doctor}? Dr. {value}."),
        ("Who is my {doctor}?", "What is the name of my {doctor}?", "Which doctor do I see as my {doctor}?")),
    NoteRelation("flight_gate", "gate", "flight to {town}", (
        "Flight to {town} leaves from gate {value}.", "gate {value} for the {town} flight, boarding soon!",
        "My flight to {town} boards at gate {value}.", "Check-in done: {town}, gate {value}.",
        "The {town} flight is at gate {value}, near the cafe.", "Gate changed to {value} for my flight to {town}.",
        "Heading to {town}: I need to be at gate {value} by noon.",
        "If anyone asks, the plane to {town} goes from gate {value}."),
        ("Which gate does my flight to {town} leave from?", "What gate is the {town} flight at?",
         "What is the gate for my flight to {town}?")),
    NoteRelation("flight_seat", "seat", "flight to {town}", (
        "I'm in seat {value} on the flight to {town}.", "Seat {value}, flight to {town}, window I hope.",
        "booked seat {value} for {town}, aisle side.", "My seat on the {town} flight is {value}.",
        "For the trip to {town} I got seat {value}.", "Boarding pass for {town}: seat {value}.",
        "Sitting in {value} on the way to {town}, come find me.", "They moved me to {value} on the {town} plane."),
        ("What seat do I have on the flight to {town}?", "Which seat am I in on the {town} flight?",
         "What is my seat number for {town}?")),
    NoteRelation("locker_code", "code4", "{venue} locker", (
        "My {venue} locker code is {value}.", "Locker at the {venue}: {value}.",
        "btw the {venue} locker opens with {value}, remember it.", "I set the {venue} locker to {value}.",
        "Code for my locker at the {venue} is {value}.", "Note to self: {venue} locker, code {value}.",
        "Typing {value} opens my locker at the {venue}.", "The {venue} locker? {value}, same as always."),
        ("What is my {venue} locker code?", "Which code opens my locker at the {venue}?",
         "What's the code for my {venue} locker?")),
    NoteRelation("door_code", "code6", "{door}", (
        "The code for {door} is {value}.", "Door code, {door}: {value}.",
        "to get into {door} punch in {value}, then push hard.", "Reminder: {door} opens with {value}.",
        "I changed the keypad at {door} to {value}.", "Keypad code for {door} is {value}, don't share it.",
        "Need to get into {door}? It's {value} on the keypad.", "{value} is what you type at {door}."),
        ("What is the code for {door}?", "Which code opens {door}?", "What do I type on the keypad at {door}?")),
    NoteRelation("wifi_name", "wifi", "wifi at {wifi_place}", (
        "btw the wifi at {wifi_place} is called {value}, don't forget.", "The wifi network at {wifi_place} is {value}.",
        "Wifi ({wifi_place}): {value}.", "At {wifi_place}, connect to the network {value}.",
        "Note: wifi name at {wifi_place} is {value}.", "I renamed the wifi at {wifi_place} to {value}.",
        "If the wifi at {wifi_place} asks, pick {value}.", "Look for {value} when joining the wifi at {wifi_place}."),
        ("What is the wifi at {wifi_place} called?", "What's the name of the wifi network at {wifi_place}?",
         "Which wifi network do I join at {wifi_place}?")),
    NoteRelation("password_hint", "hint", "{account} password", (
        "The hint word for my {account} password is {value}.", "Password hint ({account}): {value}.",
        "if I forget the {account} password, the hint is {value}.", "My {account} password hint: {value}.",
        "I set {value} as the hint for the {account} password.", "Hint for the {account} login is {value}, nothing else.",
        "Stuck on the {account} password? Think {value}.", "Just say {value} to jog my memory for the {account} password."),
        ("What is the hint word for my {account} password?", "What's my {account} password hint?",
         "Which word is the hint for my {account} password?")),
    NoteRelation("favourite_food", "dish", "{first}", (
        "{first}'s favourite food is {value}.", "{first} loves {value} more than anything.",
        "cooking {value} for {first} tonight, it's their favourite!", "Note: {first} always orders {value}.",
        "If in doubt, make {value}, {first}'s favourite.", "{first} would eat {value} every day.",
        "Nothing makes {first} happier than a plate of {value}.", "For {first}'s dinner: {value}, the favourite."),
        ("What is {first}'s favourite food?", "What does {first} love to eat?", "Which dish does {first} like best?")),
    NoteRelation("favourite_book", "book", "{first}", (
        "{first}'s favourite book is {value}.", "{first} has read {value} five times.",
        "book rec from {first}: {value}, their all-time favourite.", "{first} keeps quoting {value}, the favourite book.",
        "Note: {first} loves the novel {value}.", "{first} says {value} is the best book ever written.",
        "Ask {first} about {value}, the book they never stop talking about.",
        "The novel {first} treasures most is {value}."),
        ("What is {first}'s favourite book?", "Which book does {first} love most?", "What novel is {first}'s favourite?")),
    NoteRelation("favourite_band", "band", "{first}", (
        "{first}'s favourite band is {value}.", "{first} has seen {value} live four times.",
        "omg {first} got tickets for {value}, their favourite band!", "{first} only listens to {value} these days.",
        "Note: {first} loves the band {value}.", "On long drives {first} plays {value} nonstop.",
        "The band {first} likes most is {value}.", "Put on {value} when {first} visits, it's the favourite."),
        ("What is {first}'s favourite band?", "Which band does {first} like most?",
         "What band does {first} listen to most?")),
    NoteRelation("allergy", "allergen", "{first}", (
        "{first} is allergic to {value}.", "Careful: {first} can't have {value}, allergy.",
        "no {value} for {first} pls, they're allergic.", "Allergy note: {first}, {value}.",
        "{first} reacts badly to {value}, keep it away.", "Remember {first}'s allergy to {value} when cooking.",
        "Since {first} has a {value} allergy, check every label.",
        "Keep {value} away from {first}, the allergy is serious."),
        ("What is {first} allergic to?", "Which allergy does {first} have?",
         "What can't {first} have because of an allergy?")),
    NoteRelation("car_plate", "plate", "{car}", (
        "The plate on my {car} is {value}.", "My {car} has the number plate {value}.",
        "Registration ({car}): {value}.", "btw the {car} in the driveway is mine, plate {value}.",
        "I parked the {car}, plate {value}, by the gate.", "Insurance needs the plate of the {car}: {value}.",
        "Look for {value} on the {car}, that's ours.", "The {car} with plate {value} belongs to me."),
        ("What is the number plate of my {car}?", "What's the registration of the {car}?",
         "What plate does my {car} have?")),
    NoteRelation("plant_watering", "watering", "the {plant}", (
        "Water the {plant} every {value}.", "The {plant} gets watered on {value}.",
        "reminder: {plant} gets its water every {value}.", "Plant care: {plant}, {value}.",
        "I water my {plant} each {value}.", "Don't drown the {plant}, only on {value}.",
        "{value} is watering time for the {plant}.", "My {plant} only likes water on {value}."),
        ("When do I water the {plant}?", "Which day does the {plant} get watered?", "When should the {plant} be watered?")),
    NoteRelation("project_deadline", "date", "project {codename}", (
        "The {codename} project is due on {value}.", "Deadline for Project {codename}: {value}.",
        "heads up, {codename} has to ship by {value}.", "We must hand in the {codename} report on {value}.",
        "Project {codename} wraps up {value}, no extensions.", "The client wants {codename} finished by {value}.",
        "Circle {value} on the calendar, that's the {codename} deadline.", "{codename} goes out the door on {value}."),
        ("When is the {codename} project due?", "What is the deadline for Project {codename}?",
         "By when does {codename} have to be finished?")),
    NoteRelation("parking_spot", "parking", "car at {parking_place}", (
        "I parked at {parking_place} in spot {value}.", "Parking at {parking_place}: bay {value}.",
        "car's at {parking_place}, spot {value}, don't lose this.", "Left the car in space {value} at {parking_place}.",
        "My usual spot at {parking_place} is {value}.", "Remember: parked at {parking_place}, spot {value}.",
        "Where's the car? {parking_place}, space {value}.", "The car is waiting in {value} at {parking_place}."),
        ("Where did I park at {parking_place}?", "Which spot is my car in at {parking_place}?",
         "What is my parking spot at {parking_place}?")),
    NoteRelation("recipe_ingredient", "ingredient", "{first}'s {recipe}", (
        "The secret ingredient in {first}'s {recipe} is {value}.", "{first}'s {recipe}: don't forget the {value}!",
        "omg {first} told me the trick for the {recipe}, it's {value}.",
        "Recipe note: {recipe} like {first} makes it needs {value}.",
        "{first} adds {value} to the {recipe}, that's the secret.",
        "For {first}'s {recipe}, add a spoon of {value} at the end.",
        "What makes {first}'s {recipe} so good? A little {value}.", "Secret from {first}: put {value} in the {recipe}."),
        ("What is the secret ingredient in {first}'s {recipe}?", "What does {first} add to the {recipe}?",
         "Which ingredient makes {first}'s {recipe} special?")),
    NoteRelation("gift_idea", "gift", "gift for {first}", (
        "Gift idea for {first}: a {value}.", "{first} would love a {value} for the birthday.",
        "note to self, get {first} a {value} this year.", "For {first}'s present I'm thinking of a {value}.",
        "Present for {first} sorted: a {value}.", "I should buy {first} that {value} we saw.",
        "A {value} would make a lovely gift for {first}.", "{first} keeps hinting at a {value} as a present."),
        ("What gift idea do I have for {first}?", "What should I get {first} as a present?",
         "What present am I planning for {first}?")),
    NoteRelation("birthday", "date", "{relative} {first}", (
        "My {relative} {first}'s birthday is on {value}.", "Birthday: {first} ({relative}), {value}.",
        "don't forget my {relative} {first}'s birthday on {value}!!", "{first}, my {relative}, turns another year older on {value}.",
        "Send my {relative} {first} a card for the birthday on {value}.", "Every {value} we celebrate my {relative} {first}.",
        "{value} is the birthday of my {relative} {first}.", "Mark {value} for my {relative} {first}'s birthday party."),
        ("When is my {relative} {first}'s birthday?", "What date is {first}'s birthday?",
         "On which day does {first} celebrate a birthday?")),
    NoteRelation("shoe_size", "shoe_size", "{first}", (
        "{first} wears shoe size {value}.", "Shoes for my {relative} {first}: size {value}.",
        "fyi {first}'s shoe size is {value}, EU.", "My {relative} {first} takes a size {value} in shoes.",
        "Note: {first}, EU shoe size {value}.", "Buying boots for {first}, size {value}.",
        "Size {value} fits {first}, my {relative}, just right.",
        "If you see sneakers in size {value}, that's {first}'s size."),
        ("What shoe size does {first} wear?", "What is {first}'s shoe size?",
         "Which size shoes does {first} take?")),
    NoteRelation("bank_branch", "town", "{bank} branch", (
        "My {bank} branch is in {value}.", "Bank stuff: {bank}, branch in {value}.",
        "have to go to the {bank} branch in {value} on Friday.", "The {bank} branch I use is in {value}.",
        "I opened my account at the {bank} office in {value}.", "Note: {bank} branch, {value}, ask for the manager.",
        "Paperwork goes to {bank} in {value}, my home branch.", "{value} is where my {bank} branch is."),
        ("In which town is my {bank} branch?", "Where is my {bank} branch?", "Which town's {bank} branch do I use?")),
    NoteRelation("gym_class", "clock", "{activity} class", (
        "My {activity} class is on {weekday} at {value}.", "Gym: {activity}, {weekday}s {value}.",
        "{activity} moved to {value} on {weekday}s, ugh.", "I go to {activity} every {weekday} at {value}.",
        "Reminder: {activity} class {weekday} {value}, bring water.", "Booked {activity} for {weekday}, {value} start.",
        "See you at {activity}? It starts {value} on {weekday}.", "The {weekday} {activity} session begins at {value}."),
        ("What time is my {activity} class?", "When does my {activity} class start?",
         "At what time do I go to {activity}?")),
    NoteRelation("meeting_room", "room_name", "{team} meeting", (
        "The {team} is always in the {value} room.", "Room for the {team}: {value}.",
        "fyi {team} is in {value} again this week.", "We hold the {team} in room {value}.",
        "Booked {value} for the {team}, as usual.", "The {team} happens in the {value} meeting room.",
        "Heading to {value} for the {team}, join me.", "Every {team} ends up in the {value} room on the third floor."),
        ("Which room is the {team} in?", "Where do we hold the {team}?", "What room is booked for the {team}?")),
    NoteRelation("child_school", "school", "{first}", (
        "My {child} {first} goes to {value}.", "{first} (my {child}) started at {value} this year.",
        "school run: {first} to {value}, then work.", "My {child} {first} is a pupil at {value}.",
        "{first}'s school is {value}, pickup at the side gate.", "We enrolled my {child} {first} at {value}.",
        "Parents' evening at {value} for my {child} {first}.", "{value} is where my {child} {first} goes to school."),
        ("Which school does {first} go to?", "What is the name of {first}'s school?",
         "Where does {first} go to school?")),
    NoteRelation("neighbour_name", "full_name", "neighbour at number {house}", (
        "The neighbour at number {house} is {value}.", "Our neighbour at number {house} is called {value}.",
        "met {value} from number {house} today, really nice.", "Number {house}: {value}, waters our plants.",
        "{value} lives next door at number {house}.", "Parcel for number {house}? That's {value}.",
        "Say hello to {value} if you pass number {house}.", "The person at number {house}, {value}, lent us a ladder."),
        ("What is the name of my neighbour at number {house}?", "Who lives at number {house}?",
         "What is the neighbour at number {house} called?")),
    NoteRelation("tracking_word", "tracking", "{shop} parcel", (
        "The tracking word for the {shop} parcel is {value}.", "Parcel from {shop}: tracking word {value}.",
        "the {shop} package tracking word is {value}, just in case.",
        "To collect the {shop} order, say {value} at the counter.", "Pickup word for my {shop} delivery: {value}.",
        "I need {value} to track the {shop} package.",
        "Courier asked for {value}, that's for the {shop} box.", "Tracking the {shop} parcel? Use {value}."),
        ("What is the tracking word for the {shop} parcel?", "Which word tracks my {shop} package?",
         "What word do I need for the {shop} delivery?")),
    NoteRelation("medication", "medicine", "{condition} medication", (
        "For my {condition} I take {value} every morning.", "Meds: {value} for {condition}, one tablet.",
        "the doctor put me on {value} for my {condition}.", "I'm taking {value} to manage my {condition}.",
        "Pharmacy pickup: {value} ({condition}).", "Refill {value}, the {condition} pills, before Friday.",
        "My {condition} is better since I started {value}.", "{value} is what keeps my {condition} in check."),
        ("What do I take for my {condition}?", "Which medication do I use for {condition}?",
         "What is my {condition} medication called?")),
    NoteRelation("phone_extension", "code4", "{first} {surname}", (
        "{first} {surname}'s desk extension is {value}.", "Call {first} {surname} on extension {value}.",
        "ext. {value} is {first} {surname}, front desk.", "To reach {first} {surname}, dial {value} internally.",
        "Contacts: {first} {surname}, extension {value}.", "{first} {surname} picks up on {value}.",
        "Need {first} {surname}? Try extension {value}.", "The extension for {first} {surname} is {value}."),
        ("What is {first} {surname}'s extension?", "Which extension reaches {first} {surname}?",
         "What number do I dial internally for {first} {surname}?")),
    NoteRelation("hotel_room", "room_number", "{hotel} room", (
        "I'm staying in room {value} at the {hotel}.", "{hotel}, room {value}, checkout at eleven.",
        "we're in {value} at the {hotel} if you need us.", "My room at the {hotel} is {value}.",
        "Checked in at the {hotel}: room {value}.", "Key card for room {value}, {hotel}.",
        "Come up to {value} when you reach the {hotel}.", "The {hotel} gave me room {value}, top floor view."),
        ("What is my room number at the {hotel}?", "Which room am I in at the {hotel}?",
         "What room did I get at the {hotel}?")),
)  # fmt: skip
RELATIONS_BY_NAME = {relation.name: relation for relation in NOTE_RELATIONS}


def slots_of(template: str) -> set[str]:
    """The `{slot}` names a template uses."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def _kind(slot: str) -> str:
    return slot.rstrip(string.digits)  # "{town2}" is a second town


class NoteGenerator:
    """Deterministic stream of note documents: the same seed and split give the same documents.

    Args:
        seed: seeds the generator's own `random.Random` (no global RNG is touched), together with
            the split, so the two splits of one seed hold different values.
        split: "train" draws only training statement templates, "heldout" only held-out ones.
        facts_per_document: (min, max) facts per document, each of a different relation.
        filler: probability that a document also holds one neutral sentence ("Running low on coffee.").
    """

    def __init__(self, seed: int = 0, split: str = "train", facts_per_document: tuple[int, int] = (1, 2),
                 filler: float = 0.3):  # fmt: skip
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not 1 <= facts_per_document[0] <= facts_per_document[1] <= len(NOTE_RELATIONS):
            raise ValueError(f"facts_per_document must be (min, max) with 1 <= min <= max <= "
                             f"{len(NOTE_RELATIONS)}, got {facts_per_document!r}")  # fmt: skip
        # The split is part of the seed: seed 0 of "heldout" must not restate seed 0 of "train".
        self.rng = random.Random(seed if split == "train" else f"heldout:{seed}")
        self.split = split
        self.facts_per_document = facts_per_document
        self.filler = filler

    # --- state (for exact resume) ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    # --- facts ----------------------------------------------------------------------------
    def templates(self, relation: NoteRelation) -> tuple[str, ...]:
        cut = len(relation.statements) - relation.heldout
        return relation.statements[:cut] if self.split == "train" else relation.statements[cut:]

    def fact(self, relation: NoteRelation) -> tuple[str, QA, str]:
        """One fact of `relation`: (statement, question and answer, subject)."""
        statement = self.rng.choice(self.templates(relation))
        question = self.rng.choice(relation.questions)
        names = sorted((slots_of(statement) | slots_of(question) | slots_of(relation.subject)) - {"value"})
        slots = {name: KINDS[_kind(name)](self.rng) for name in names}
        slots["value"] = value = KINDS[relation.value](self.rng)
        qa = QA(relation.name, question.format(**slots), " " + value)
        return statement.format(**slots), qa, relation.subject.format(**slots)

    def document(self) -> FactDocument:
        """One note: 1-2 facts (by default) in random order, sometimes with a neutral sentence among them."""
        count = self.rng.randint(*self.facts_per_document)
        facts = [self.fact(relation) for relation in self.rng.sample(NOTE_RELATIONS, count)]
        sentences = [statement for statement, _, _ in facts]
        if self.rng.random() < self.filler:
            sentences.insert(self.rng.randint(0, len(sentences)), self.rng.choice(FILLER))
        qa = tuple(qa for _, qa, _ in facts)
        return FactDocument(" ".join(sentences), qa, "; ".join(subject for _, _, subject in facts))


def chance_level(relation: str) -> float:
    """Probability of hitting the answer by guessing the relation's most likely value."""
    return _CHANCE.get(RELATIONS_BY_NAME[relation].value, 0.0)
