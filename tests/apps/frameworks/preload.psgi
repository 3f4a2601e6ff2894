# The base of the frameworks' fleet: every framework's app loaded once (its
# modules, its classes, its templates' engines), so that each vassal adopted
# from it loads its own psgi file on a warm heap. Serves the Catalyst app
# itself (a vassal without a psgi key is the preloaded Catalyst app).
use strict;
use warnings;
use File::Basename ();
use Plack::Util ();
use DBI ();
use Fcntl qw(O_WRONLY O_APPEND O_CREAT);

# An END block of the codebase: it runs in every process forked from here
# that exits gracefully; a vassal with CODEBASE_EXIT_DIR in its env says so there.
END {
    if (my $dir = $ENV{CODEBASE_EXIT_DIR}) {
        my $fh;
        sysopen $fh, "$dir/events", O_WRONLY | O_APPEND | O_CREAT and syswrite $fh, "END $$\n";
    }
}

my $here = File::Basename::dirname(__FILE__);
our %APPS = map { $_ => Plack::Util::load_psgi("$here/$_") }
    qw(mojo.psgi dancer/app.psgi plack.psgi);

# What a codebase often does while it loads: a handle on a database, left
# connected. Every vassal forked from here shares its connection.
our $DBH = DBI->connect("dbi:SQLite:dbname=" . ($ENV{FRAMEWORKS_STATE} // '/tmp') . "/preload.db",
    '', '', { RaiseError => 1 });
$DBH->do('CREATE TABLE IF NOT EXISTS seen (n INTEGER)');

my $catalyst = Plack::Util::load_psgi("$here/catalyst/catapp.psgi");
# ... and a DBIx::Class schema that checked its database while loading:
# connected too, but DBIx::Class reconnects after a fork by itself
CatApp->model('DB')->storage->ensure_connected;

# An object only the codebase's app holds, with a DESTROY: every process
# forked from here inherits it, to use, not to destroy as it leaves (its
# DESTROY is the base's, at the base's own exit).
{
    package PreloadProbe;
    sub new { bless {}, shift }
    sub DESTROY {
        my $dir = $ENV{CODEBASE_EXIT_DIR} or return;
        my $fh;
        sysopen $fh, "$dir/events", Fcntl::O_WRONLY() | Fcntl::O_APPEND() | Fcntl::O_CREAT()
            and syswrite $fh, "DESTROY $$\n";
    }
}
my $probe = PreloadProbe->new;
sub { $probe or die; $catalyst->(@_) };
