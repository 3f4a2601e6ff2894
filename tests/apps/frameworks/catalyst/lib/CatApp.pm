package CatApp;
use Moose;
use namespace::autoclean;
use File::Basename ();
use File::Spec ();

# A Catalyst app as its users write one: TT view, DBIx::Class model on
# SQLite, sessions in FastMmap with a cookie. Catalyst's setup puts an
# :encoding(UTF-8) layer on STDERR.
use Catalyst qw(
    Session
    Session::Store::FastMmap
    Session::State::Cookie
);

extends 'Catalyst';

my $dir = $ENV{FRAMEWORKS_STATE} // '/tmp';

__PACKAGE__->config(
    name     => 'CatApp',
    home     => File::Spec->rel2abs(File::Basename::dirname(__FILE__) . '/..'),
    root     => File::Spec->rel2abs(File::Basename::dirname(__FILE__) . '/../root'),
    encoding => 'UTF-8',
    default_view => 'HTML',
    disable_component_resolution_regex_fallback => 1,
    'Plugin::Session' => {
        storage     => "$dir/catapp-sessions",
        cookie_name => 'catapp_session',
        expires     => 3600,
    },
    'Model::DB' => {
        schema_class => 'CatApp::Schema',
        connect_info => {
            dsn      => "dbi:SQLite:dbname=$dir/catapp.db",
            sqlite_unicode => 1,
            on_connect_do => ['CREATE TABLE IF NOT EXISTS note (id INTEGER PRIMARY KEY, body TEXT NOT NULL)'],
        },
    },
);

__PACKAGE__->setup;

1;
