"""The knowledge probe's facts: closed-book questions a small chat model may know, each with a sentence stem that
the probe puts at the start of the model's reply ("The capital of France is") and the accepted answers.

Training rows answer with the whole sentence ("The capital of France is Paris."); the probe prefills the stem
and scores what the model writes next (scoring.exact_match), so the score is about the fact, not the phrasing.
Which facts the base model knows is measured, not assumed: the experiment keeps only those it answers
correctly (experiment.select_facts).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    category: str
    question: str
    stem: str
    answers: tuple[str, ...]  # the first is the one training rows use

    @property
    def key(self) -> str:
        return f"{self.category}: {self.question}"

    def row(self) -> dict:
        """A training (or routing) row: the question, answered with the whole sentence; task_type knowledge."""
        answer = f"{self.stem} {self.answers[0]}."
        return {"messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": answer}],
                "task_type": "knowledge"}


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "the United Kingdom": "London", "Ireland": "Dublin",
    "Greece": "Athens", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogotá", "Venezuela": "Caracas", "Cuba": "Havana", "India": "New Delhi", "Pakistan": "Islamabad",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "North Korea": "Pyongyang",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran",
    "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Turkey": "Ankara", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Afghanistan": "Kabul", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Sudan": "Khartoum",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Australia": "Canberra", "New Zealand": "Wellington",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Iceland": "Reykjavik", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "Mongolia": "Ulaanbaatar", "Qatar": "Doha", "Senegal": "Dakar", "Jamaica": "Kingston",
    "Ecuador": "Quito", "Uruguay": "Montevideo", "Paraguay": "Asunción", "Brazil": "Brasília",
    "Scotland": "Edinburgh", "Wales": "Cardiff",
}
CAPITAL_ALIASES = {"Kyiv": ("Kiev",), "Reykjavik": ("Reykjavík",), "Ulaanbaatar": ("Ulan Bator",)}

ELEMENTS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "copper": "Cu", "sodium": "Na", "potassium": "K", "lead": "Pb",
    "tin": "Sn", "mercury": "Hg", "oxygen": "O", "hydrogen": "H", "carbon": "C", "nitrogen": "N", "helium": "He",
    "neon": "Ne", "calcium": "Ca", "magnesium": "Mg", "zinc": "Zn", "sulfur": "S", "chlorine": "Cl",
    "fluorine": "F", "phosphorus": "P", "silicon": "Si", "aluminum": "Al", "uranium": "U", "platinum": "Pt",
    "nickel": "Ni", "lithium": "Li", "iodine": "I", "argon": "Ar", "tungsten": "W", "cobalt": "Co",
    "chromium": "Cr", "titanium": "Ti", "boron": "B", "radon": "Rn",
}

BOOKS = {
    "Hamlet": ("William Shakespeare", "Shakespeare"),
    "Romeo and Juliet": ("William Shakespeare", "Shakespeare"),
    "Macbeth": ("William Shakespeare", "Shakespeare"),
    "Pride and Prejudice": ("Jane Austen",),
    "Nineteen Eighty-Four": ("George Orwell",),
    "Animal Farm": ("George Orwell",),
    "The Great Gatsby": ("F. Scott Fitzgerald", "Scott Fitzgerald", "F Scott Fitzgerald"),
    "Moby-Dick": ("Herman Melville",),
    "War and Peace": ("Leo Tolstoy", "Tolstoy"),
    "Anna Karenina": ("Leo Tolstoy", "Tolstoy"),
    "Crime and Punishment": ("Fyodor Dostoevsky", "Dostoevsky"),
    "Don Quixote": ("Miguel de Cervantes", "Cervantes"),
    "The Odyssey": ("Homer",),
    "The Iliad": ("Homer",),
    "The Hobbit": ("J. R. R. Tolkien", "JRR Tolkien", "Tolkien"),
    "The Lord of the Rings": ("J. R. R. Tolkien", "JRR Tolkien", "Tolkien"),
    "Oliver Twist": ("Charles Dickens", "Dickens"),
    "A Tale of Two Cities": ("Charles Dickens", "Dickens"),
    "Great Expectations": ("Charles Dickens", "Dickens"),
    "Frankenstein": ("Mary Shelley",),
    "Dracula": ("Bram Stoker",),
    "The Adventures of Tom Sawyer": ("Mark Twain",),
    "To Kill a Mockingbird": ("Harper Lee",),
    "On the Origin of Species": ("Charles Darwin", "Darwin"),
    "Les Misérables": ("Victor Hugo",),
    "The Divine Comedy": ("Dante Alighieri", "Dante"),
    "The Catcher in the Rye": ("J. D. Salinger", "JD Salinger", "Salinger"),
    "Jane Eyre": ("Charlotte Brontë",),
    "Wuthering Heights": ("Emily Brontë",),
    "The Raven": ("Edgar Allan Poe",),
    "Alice's Adventures in Wonderland": ("Lewis Carroll",),
    "The Old Man and the Sea": ("Ernest Hemingway", "Hemingway"),
    "Brave New World": ("Aldous Huxley",),
    "Harry Potter and the Philosopher's Stone": ("J. K. Rowling", "JK Rowling"),
    "The Little Prince": ("Antoine de Saint-Exupéry",),
}

LANGUAGES = {
    "Brazil": "Portuguese", "Mexico": "Spanish", "France": "French", "Germany": "German", "Japan": "Japanese",
    "Russia": "Russian", "Italy": "Italian", "Egypt": "Arabic", "the Netherlands": "Dutch", "Sweden": "Swedish",
    "Greece": "Greek", "Poland": "Polish", "Turkey": "Turkish", "Argentina": "Spanish", "Portugal": "Portuguese",
    "South Korea": "Korean", "Israel": "Hebrew", "Finland": "Finnish", "Iran": "Persian", "China": "Mandarin",
}
LANGUAGE_ALIASES = {"Persian": ("Farsi",), "Mandarin": ("Chinese", "Mandarin Chinese")}

# (question, stem, answers): people, places and things
MISC = [
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by", ("Leonardo da Vinci", "Leonardo", "da Vinci")),
    ("Who painted The Starry Night?", "The Starry Night was painted by", ("Vincent van Gogh", "Van Gogh")),
    ("Who painted The Last Supper?", "The Last Supper was painted by", ("Leonardo da Vinci", "Leonardo", "da Vinci")),
    ("Who painted Guernica?", "Guernica was painted by", ("Pablo Picasso", "Picasso")),
    ("Who painted The Scream?", "The Scream was painted by", ("Edvard Munch", "Munch")),
    ("Who invented the telephone?", "The telephone was invented by", ("Alexander Graham Bell", "Graham Bell")),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by",
     ("Albert Einstein", "Einstein")),
    ("Who formulated the laws of motion and universal gravitation?",
     "The laws of motion and universal gravitation were formulated by", ("Isaac Newton", "Sir Isaac Newton", "Newton")),
    ("Who discovered penicillin?", "Penicillin was discovered by", ("Alexander Fleming", "Sir Alexander Fleming")),
    ("Who proposed the theory of evolution by natural selection?",
     "The theory of evolution by natural selection was proposed by", ("Charles Darwin", "Darwin")),
    ("Who invented the World Wide Web?", "The World Wide Web was invented by",
     ("Tim Berners-Lee", "Sir Tim Berners-Lee")),
    ("Who was the first person to walk on the Moon?", "The first person to walk on the Moon was", ("Neil Armstrong",)),
    ("Who was the first President of the United States?", "The first President of the United States was",
     ("George Washington",)),
    ("Who composed the Moonlight Sonata?", "The Moonlight Sonata was composed by",
     ("Ludwig van Beethoven", "Beethoven")),
    ("Who composed The Magic Flute?", "The Magic Flute was composed by",
     ("Wolfgang Amadeus Mozart", "Mozart", "Amadeus Mozart")),
    ("What is the largest planet in the solar system?", "The largest planet in the solar system is", ("Jupiter",)),
    ("Which planet is closest to the Sun?", "The planet closest to the Sun is", ("Mercury",)),
    ("Which planet is known as the Red Planet?", "The planet known as the Red Planet is", ("Mars",)),
    ("Which planet has the most famous rings?", "The planet with the most famous rings is", ("Saturn",)),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the", ("Pacific Ocean", "Pacific")),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is",
     ("Mount Everest", "Everest")),
    ("What is the largest desert in Africa?", "The largest desert in Africa is the", ("Sahara", "Sahara Desert")),
    ("What is the longest river in South America?", "The longest river in South America is the",
     ("Amazon", "Amazon River")),
    ("What gas do plants absorb from the air for photosynthesis?",
     "For photosynthesis, plants absorb", ("carbon dioxide", "CO2")),
    ("What is the largest mammal?", "The largest mammal is the", ("blue whale",)),
    ("What is the fastest land animal?", "The fastest land animal is the", ("cheetah",)),
    ("What is the largest organ of the human body?", "The largest organ of the human body is the", ("skin",)),
    ("Which organ pumps blood through the human body?", "The organ that pumps blood through the human body is the",
     ("heart",)),
    ("How many legs does a spider have?", "A spider has", ("eight legs", "8 legs")),
    ("How many continents are there?", "There are", ("seven continents", "7 continents")),
    ("In which city is the Eiffel Tower?", "The Eiffel Tower is in", ("Paris",)),
    ("In which city is the Colosseum?", "The Colosseum is in", ("Rome",)),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in", ("Egypt",)),
    ("In which country is the Taj Mahal?", "The Taj Mahal is in", ("India",)),
    ("In which city is the Statue of Liberty?", "The Statue of Liberty is in", ("New York", "New York City")),
]


def all_facts() -> list[Fact]:
    """Every fact, in a fixed order (the experiment shuffles and splits them with its own seed)."""
    facts = [
        Fact("capital", f"What is the capital of {country}?", f"The capital of {country} is",
             (city, *CAPITAL_ALIASES.get(city, ())))
        for country, city in CAPITALS.items()
    ]
    facts += [
        Fact("element", f"What is the chemical symbol for {element}?", f"The chemical symbol for {element} is",
             (symbol,))
        for element, symbol in ELEMENTS.items()
    ]
    facts += [Fact("author", f"Who wrote {title}?", f"{title} was written by", authors)
              for title, authors in BOOKS.items()]
    facts += [
        Fact("language", f"What is the main language of {country}?", f"The main language of {country} is",
             (language, *LANGUAGE_ALIASES.get(language, ())))
        for country, language in LANGUAGES.items()
    ]
    facts += [Fact("misc", question, stem, answers) for question, stem, answers in MISC]
    return facts
